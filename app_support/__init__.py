"""App-side helpers of the knee-MRI Gradio app: settings, job folders, usage stats, tables.

``app.py`` only builds the page; everything it calls lives here so it can be tested without
a browser and without Gradio's server.
"""

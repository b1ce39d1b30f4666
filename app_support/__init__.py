"""App-side modules of the knee-MRI Gradio app: settings, the durable job store and queue,
where jobs run (worker process, ZeroGPU, a Dask cluster), uploads and retention, usage stats,
tables and viewers.

``app.py`` only builds the page; everything it calls lives here so it can be tested without
a browser and without Gradio's server.
"""

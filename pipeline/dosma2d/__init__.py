"""DOSMA 2D knee U-Nets (Goyal 2024) in torch: Keras .h5 graph runner, DOSMA pre/postprocessing,
STAPLE."""

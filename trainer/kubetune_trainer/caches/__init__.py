"""What frozen encoders made of the training data, kept so no input is encoded twice.

`entries` is the folder of named tensor entries both caches share (hit, miss, encode the
missing ones together); `latents` holds the VAE's encodings of images, `text` the caption
encodings, and `mirror` copies either cache under the output URI so a new pod reuses them.
"""

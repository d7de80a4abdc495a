"""The props of `kubetune demo`: a tiny random-weight model, a generated dataset and an S3 server
on loopback (moto). Not part of the product packages: the trainer image does not ship them, and
`kubetune demo` says how to install them (the `demo` extra) when they are missing.
"""

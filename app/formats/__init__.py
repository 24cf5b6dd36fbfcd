"""File formats: what an uploaded model or dataset file is, whether it is safe, and what it holds.

One layer below both the API (app/) and the workers (workers/): ONNX files and zips (onnx_files, with the
protobuf wire reader onnx_wire), Keras files (keras_files), Hugging Face folders (huggingface), datasets
(dataset_files), input shapes (input_shapes), pickle sniffing (pickles), unpacking limits (limits) and text a
database cannot store (text). Nothing here imports the service (no settings, database, store or routes): a
setting a check needs is passed in as an argument; errors raised are app.errors classes.
"""

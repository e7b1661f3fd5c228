"""Models on the device: the store on disk, onnxruntime sessions, the active registry.

Where the two flows meet: updates write the store and swap the registry; serving
reads the registry.
"""

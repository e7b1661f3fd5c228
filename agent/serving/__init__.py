"""The request flow: the HTTP transport, codecs, routes, and the one inference core
under ``/predict`` and the Open Inference Protocol."""

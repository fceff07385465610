"""The HTTP layer: Flask only. Views parse a request, call one serving object, render its answer."""

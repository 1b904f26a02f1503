"""What a request can do wrong: answered 422 with the message, never a traceback."""


class RequestProblem(ValueError):
    """Bad input in a request (a value out of range, bad base64, an unknown model name): HTTP 422."""

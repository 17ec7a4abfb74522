"""The requests the controller refuses, by kind: the front ends map them to answers."""


class ControllerError(Exception):
    """A request the controller refuses; the message is for the user."""


class NotFoundError(ControllerError):
    """No such network, node or member."""


class ConflictError(ControllerError):
    """The request collides with existing state (an IP in use, a full subnet)."""


class InvalidArgumentError(ControllerError):
    """A malformed name, subnet, address or key."""

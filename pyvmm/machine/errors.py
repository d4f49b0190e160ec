"""Errors of the machine layer. Each carries a one-line message meant for the user."""


class MachineError(RuntimeError):
    """The VM could not be built or stopped with an error."""


class ImageError(MachineError):
    """The guest image is not a bootable PVH ELF, or does not fit."""


class GuestMemoryError(MachineError):
    """An access outside guest RAM."""

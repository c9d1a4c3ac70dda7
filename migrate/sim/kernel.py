"""Placeholder replaced below."""
class Kernel:
    def __init__(self, machine):
        self.machine = machine

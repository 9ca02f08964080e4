"""Test support that ships with the library: tiny randomly initialised model folders built from the
released architectures' configs (`tiny_components`), for tests, the demo and adapter authors."""

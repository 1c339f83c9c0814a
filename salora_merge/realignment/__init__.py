"""realignment."""

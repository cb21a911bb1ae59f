"""The course's helpers on top of everything else: exercise ``checks``, ``plots`` and summary ``tables``."""

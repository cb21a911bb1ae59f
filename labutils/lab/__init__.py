"""The course's helpers on top of everything else: exercise ``checks``, the tagged notebooks and their student copies
(``course``), ``grading`` of submissions, 01-Setup's ``environment`` tables, ``plots`` and summary ``tables``."""

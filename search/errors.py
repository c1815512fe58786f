"""The one base class of what the tool raises, so a caller can catch all of it and only it.

Each error keeps a second base (ValueError, RuntimeError) where code or tests catch it by that.
This module imports nothing from the project: every other module may import it.
"""


class SearchError(Exception):
    """Something the search tool raises on purpose: a bad config, an infeasible trial, a failed stage."""

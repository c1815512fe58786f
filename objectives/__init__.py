"""Quality objectives for the compression search: scorers, recovery maths, fidelity metrics, tasks."""

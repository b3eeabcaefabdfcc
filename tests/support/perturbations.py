"""Fixed draws for the metrics that perturb their input (tests/evaluation/test_robustness*.py)."""


class Feed:
    """A ``perturb_func`` handing out ``x + noise[k]`` for its k-th call (the generator is ignored), so a test
    knows every draw a metric makes and can feed the same ones to a loop written out or to a peer library."""

    def __init__(self, noise):
        self.noise, self.calls = noise, 0

    def __call__(self, x, generator):
        out = x + self.noise[self.calls]
        self.calls += 1
        return out

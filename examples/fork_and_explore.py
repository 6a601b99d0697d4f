"""Fork and explore: prepare a session once, fork it into branches that each try another
approach from the same state, keep the best, delete the rest.

    FORKVM_URL=http://127.0.0.1:8080 FORKVM_API_KEY=fvk_... python3 examples/fork_and_explore.py
"""

import json

from forkvm import Sandbox

SETUP = """
import numpy as np
rng = np.random.default_rng(0)
x = np.linspace(-3, 3, 400)
y = 0.5 * x**3 - x + rng.normal(0, 1.0, x.size)
train, test = slice(0, None, 2), slice(1, None, 2)
"""

TRY = """
coef = np.polyfit(x[train], y[train], {degree})
error = float(np.mean((np.polyval(coef, x[test]) - y[test]) ** 2))
print(json.dumps({{"degree": {degree}, "test_mse": error}}))
"""


def main():
    degrees = [1, 2, 3, 5, 9]
    with Sandbox.create() as base:
        base.run("import json" + SETUP)  # the expensive part, done once
        branches = base.fork(len(degrees))  # each starts from exactly this state
        try:
            scores = []
            for degree, branch in zip(degrees, branches):
                result = branch.run(TRY.format(degree=degree))
                if not result.ok:
                    raise SystemExit(f"degree {degree} failed: {result.stderr}")
                scores.append((json.loads(result.stdout), branch))
            for score, _ in scores:
                print(f"degree {score['degree']}: test MSE {score['test_mse']:.3f}")
            best, keep = min(scores, key=lambda s: s[0]["test_mse"])
            print(f"best: degree {best['degree']}")
            # Carry on from the winning branch: its fitted coefficients are still there.
            print("kept branch says:", keep.run("print(len(coef) - 1)").stdout.strip())
        finally:
            for branch in branches:
                branch.kill()


if __name__ == "__main__":
    main()

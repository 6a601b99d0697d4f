"""Data analysis with a plot: the code saves a PNG in the sandbox, and the PNG comes back
through the session's files.

Needs a server whose template has pandas and matplotlib (built once, about a minute):

    forkvm template build ds --packages pandas,matplotlib
    forkvm serve --template ds
    FORKVM_URL=http://127.0.0.1:8080 FORKVM_API_KEY=fvk_... python3 examples/plot_to_png.py
"""

import sys

from forkvm import Sandbox

CODE = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

rng = np.random.default_rng(1)
df = pd.DataFrame({"day": np.arange(60), "users": np.cumsum(rng.poisson(20, 60))})
df["weekly_mean"] = df["users"].rolling(7).mean()
ax = df.plot(x="day", y=["users", "weekly_mean"], figsize=(6, 3.5), title="Sign-ups")
ax.figure.tight_layout()
ax.figure.savefig("/tmp/signups.png", dpi=100)
print(df.tail(3).to_string(index=False))
"""


def main():
    template = sys.argv[1] if len(sys.argv) > 1 else None  # the server's own by default
    with Sandbox.create(template=template) as session:
        result = session.run(CODE, timeout=60)
        print(result.stdout, result.stderr, sep="")
        png = session.files.read("/tmp/signups.png")
        assert png.startswith(b"\x89PNG"), "not a PNG"
        with open("signups.png", "wb") as out:
            out.write(png)
        print(f"wrote signups.png ({len(png)} bytes)")


if __name__ == "__main__":
    main()

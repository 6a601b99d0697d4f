"""An agent loop: a model writes code, forkvm runs it, the output goes back to the model.

The "model" here is a scripted stand-in so the example runs anywhere; replace
``propose_code`` with a call to your LLM (give it the task and the transcript, ask for the
next Python cell). Everything the code defines persists between turns: it runs in one
session, like the cells of a notebook.

    FORKVM_URL=http://127.0.0.1:8080 FORKVM_API_KEY=fvk_... python3 examples/agent_loop.py
"""

from forkvm import Sandbox

TASK = "Find the 10 most common words in a generated text and report their share."


def propose_code(task, transcript):
    """The next cell to run (stand-in for a model; `transcript` is [(code, output)])."""
    script = [
        "import random, collections\n"
        "random.seed(7)\n"
        "words = random.choices(['fork', 'vm', 'agent', 'code', 'sandbox', 'kvm'], k=5000)\n"
        "print(len(words), 'words')",
        "counts = collections.Counter(words)\nprint(counts.most_common(3))",
        # A mistake, as models make: the traceback goes back to the model.
        "print(share)",
        "share = {w: round(n / len(words), 3) for w, n in counts.most_common(10)}\n"
        "print(share)\nprint('DONE')",
    ]
    return script[len(transcript)] if len(transcript) < len(script) else "print('DONE')"


def main():
    transcript = []
    with Sandbox.create() as session:
        for turn in range(10):
            code = propose_code(TASK, transcript)
            result = session.run(code, timeout=30)
            output = result.stdout + result.stderr
            if result.error is not None:
                output += f"\n[ended by {result.error.kind}: {result.error.message}]"
            print(f"--- turn {turn + 1} (exit {result.exit_code}) ---\n{code}\n>>> {output.strip()}")
            transcript.append((code, output))
            if "DONE" in result.stdout:
                break
    print(f"agent finished after {len(transcript)} turns")


if __name__ == "__main__":
    main()

"""Example task handlers for a drone's Python worker pool (used by the demo, ./run-hive).

Run them in a pool (from the repository root)::

    drone --queen 127.0.0.1:8080 \\
          --pool 'py:2=python3 -m hive worker tasks'     # cwd: sdk/python/examples,
                                                        # PYTHONPATH: sdk/python

and submit work with the client::

    import hive
    c = hive.Client("http://127.0.0.1:8081")
    t = c.wait(c.submit("py.greet", {"name": "Ada"})["id"], timeout=30)
    print(t["result"])          # {'greeting': 'Hello, Ada!'}
"""

import asyncio
import collections
import re

from hive import PermanentError, task


@task("py.greet")
def greet(payload, ctx):
    """``{"name": "Ada"}`` -> ``{"greeting": "Hello, Ada!"}``."""
    name = (payload or {}).get("name", "world") if isinstance(payload, dict) else payload
    if not isinstance(name, str) or not name:
        raise PermanentError("payload must be {\"name\": \"<a non-empty string>\"}")
    return {"greeting": "Hello, {}!".format(name), "attempt": ctx.attempt}


@task("py.wordcount")
def wordcount(payload, ctx):
    """``{"text": "..."}`` (or a string) -> the word count and the most common words.

    Long texts are counted in chunks, with a checkpoint after each, so a later attempt
    resumes where this one stopped.
    """
    text = payload.get("text") if isinstance(payload, dict) else payload
    if not isinstance(text, str):
        raise PermanentError("payload must be a string or {\"text\": \"...\"}")
    lines = text.splitlines() or [""]
    state = ctx.last_checkpoint or {"line": 0, "counts": {}}
    counts = collections.Counter(state["counts"])
    chunk = 1000
    for start in range(state["line"], len(lines), chunk):
        for word in re.findall(r"[\w']+", "\n".join(lines[start:start + chunk]).lower()):
            counts[word] += 1
        done = min(start + chunk, len(lines))
        if done < len(lines):
            ctx.checkpoint({"line": done, "counts": dict(counts), "progress": done / len(lines)})
    return {"words": sum(counts.values()), "distinct": len(counts), "top": counts.most_common(5)}


@task("py.sleep")
async def sleep(payload, ctx):
    """``{"seconds": 0.5}`` -> sleeps without blocking the process's event loop."""
    seconds = float((payload or {}).get("seconds", 0.1)) if isinstance(payload, dict) else 0.1
    await asyncio.sleep(seconds)
    return {"slept": seconds}

"""A separate process using a result store, for tests of what several processes share.

    store_child.py SPEC write ID [DELAY]   save SUCCESS {"pid": ...} for ID (after DELAY s);
                                           prints the time.time() right after the save
    store_child.py SPEC read ID            prints the record's JSON, or null
    store_child.py SPEC chord ID SIZE THREADS   adds the indexes read from stdin (a JSON
                                           list) from THREADS threads; prints one JSON line
                                           per call (index, recorded, done, complete, won)

SPEC is the JSON of ``StoreFactory.spec()``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from store_fixtures import open_store

from amqptasks.results.meta import SUCCESS, ResultMeta


def chord(store: Any, chord_id: str, size: int, threads: int, indexes: list[int]) -> None:
    lines: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run(mine: list[int]) -> None:
        start.wait()
        for index in mine:
            meta = ResultMeta(id=f"{chord_id}-{index}", status=SUCCESS, result=index)
            progress = store.chord_add(chord_id, size, index, meta)
            won = progress.complete and store.chord_mark_body_sent(chord_id)
            line = json.dumps(
                {
                    "index": index,
                    "recorded": progress.recorded,
                    "done": progress.done,
                    "complete": progress.complete,
                    "won": won,
                    "results_ok": progress.results == list(range(size))
                    if progress.complete
                    else progress.results is None,
                    "pid": os.getpid(),
                }
            )
            with lock:
                lines.append(line)

    workers = [threading.Thread(target=run, args=(indexes[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print("\n".join(lines))


def main() -> None:
    spec = json.loads(sys.argv[1])
    command, task_id = sys.argv[2], sys.argv[3]
    store = open_store(spec)
    try:
        if command == "write":
            time.sleep(float(sys.argv[4]) if len(sys.argv) > 4 else 0)
            store.save([ResultMeta(id=task_id, status=SUCCESS, result={"pid": os.getpid()})])
            print(repr(time.time()))
        elif command == "read":
            meta = store.get(task_id)
            print("null" if meta is None else meta.to_json().decode())
        elif command == "chord":
            chord(store, task_id, int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.stdin.read()))
        else:
            raise SystemExit(f"unknown command {command!r}")
    finally:
        store.close()


if __name__ == "__main__":
    main()

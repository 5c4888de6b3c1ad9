"""A 300 MB object passes through the Store streamed: peak RSS stays under 200 MB."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from support.flowproc import TESTS

SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import trio
    from nodes.payload import FilePayload
    from nodes.store import StoreConfig
    from support.storenodes import Sink, arrival, running

    work = Path(sys.argv[1])
    big = work / "big.dcm"
    expected = hashlib.sha256()
    with open(big, "wb") as f:
        for i in range(300):                       # 300 MiB, one MiB at a time
            block = i.to_bytes(4, "big") * (1 << 18)
            expected.update(block)
            f.write(block)

    async def main():
        sink = Sink()
        config = StoreConfig(min_free_disk_mb=0, retention_s=0, purge_interval_s=0.1)
        async with running(work / "data", {"pacs": sink}, config) as (feed, store, _):
            a = arrival("1.9.1", FilePayload(big))
            await feed.put(a)
            await a.receipt.wait()
            await sink.wait_for(lambda: sink.delivered == ["1.9.1"], timeout=120)
            with trio.fail_after(30):
                while store.report()["store"]["objects"]:   # purged: retention_s = 0
                    await trio.sleep(0.05)
        return sink.seen

    seen = trio.run(main)
    big.unlink()
    # VmHWM is this process image's own peak RSS. Not ru_maxrss: Linux carries the peak of
    # the image that exec replaced into it, and a vfork()ed child's old image is its
    # parent's (pytest, hundreds of MB into the suite).
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(json.dumps({"seen": seen, "expected": expected.hexdigest(),
                      "maxrss_mb": int(status["VmHWM"].split()[0]) / 1024}))
''')


def test_300_mb_object_streams_with_peak_rss_under_200_mb(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=300,
                            env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["seen"] == [["1.9.1", doc["expected"], 1]]
    assert doc["maxrss_mb"] < 200, doc
    assert not any((tmp_path / "data" / "spool").iterdir())  # purged after delivery

"""Sample the resident set of a process and its children every 0.5 s: `python rss_tree.py PID OUT` (until PID exits)."""
import os, sys, time

def children(pid):
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out

def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0

root, out = int(sys.argv[1]), sys.argv[2]
peak = 0.0
with open(out, "w") as f:
    while os.path.exists(f"/proc/{root}"):
        todo, seen, total, top = [root], set(), 0.0, (0.0, 0)
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            r = rss(p)
            total += r
            top = max(top, (r, p))
            todo += children(p)
        if total > peak:
            peak = total
        f.write(f"{time.time():.1f} {total:.0f} {top[0]:.0f} {top[1]}\n")
        f.flush()
        time.sleep(0.5)
    f.write(f"# peak {peak:.0f} MiB\n")

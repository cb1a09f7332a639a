"""Load test of `vlmoe serve` on loopback: latency, errors, peak memory, page-ready time.

    python bench/serve_load.py --checkpoint checkpoints/default            # 200 requests, 8 at a time
    python bench/serve_load.py --checkpoint ck --requests 200 --concurrency 8 --browser

Starts `vlmoe serve` as a subprocess on 127.0.0.1 (a free port) and sends real multipart
POST /api/ask requests (easy-VQA test images, one question each) from a thread pool. Bounded:
at most --requests requests per phase, each with a 30 s timeout, and no new request after
--time-limit seconds. Only 127.0.0.1 is ever contacted.

Rows (medians and 95th percentiles in ms):
  in-process ask()   the baseline, measured in this run: `vlmoe.serve.inference.ask` called
                     directly, no HTTP, one at a time
  HTTP, 1 at a time  the served path without contention, alternating request by request with
                     the baseline (so that both see the same load of a shared machine)
  HTTP, N at a time  the load test proper
"client" is the latency seen by the client (queueing included); "server" is the handler's own
`timing_ms.total` (form parsing, decode, waiting for the model's lock, forward, JSON).
Peak memory is the server process's VmHWM. With --browser, the page's time from navigation to
ready (examples and model info loaded, handlers attached) in headless Chromium, median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import easy_vqa
import torch

from vlmoe.data import load_image
from vlmoe.serve.harness import multipart, request, serve_process
from vlmoe.serve.inference import ask, load_served_model


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def bodies(n: int) -> list[tuple[bytes, str]]:
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    out = []
    for row in range(0, len(questions), max(1, len(questions) // n))[:n]:
        with open(paths[image_ids[row]], "rb") as f:
            files = {"image": (f"{image_ids[row]}.png", f.read(), "image/png")}
        out.append(multipart({"question": questions[row]}, files))
    return out


def phase(url: str, reqs: list[tuple[bytes, str]], n: int, conc: int, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s

    def one(i: int) -> tuple[float, float, int]:
        if time.monotonic() > deadline:
            return float("nan"), float("nan"), -1  # not sent: over the time bound
        body, ctype = reqs[i % len(reqs)]
        t0 = time.perf_counter()
        try:
            status, res = request(url + "api/ask", body, ctype, timeout=30)
        except OSError:
            return (time.perf_counter() - t0) * 1e3, float("nan"), 0
        client = (time.perf_counter() - t0) * 1e3
        server = res["timing_ms"]["total"] if status == 200 else float("nan")
        return client, server, status

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[2] == 200]
    return {
        "sent": sum(r[2] != -1 for r in results),
        "errors": sum(r[2] not in (200, -1) for r in results),
        "client": [r[0] for r in ok],
        "server": [r[1] for r in ok],
        "rps": len(ok) / wall,
    }


def interleaved(url: str, checkpoint: str, reqs: list, n: int, limit_s: float) -> tuple:
    """The baseline and the 1-at-a-time HTTP path, alternating request by request, so that
    both see the same machine load: → (baseline ms list, phase dict)."""
    served = load_served_model(checkpoint, "a")
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    base: list[float] = []
    http = {"sent": 0, "errors": 0, "client": [], "server": [], "rps": 0.0}
    t_http = 0.0
    for i in range(n + 3):
        image = load_image(paths[image_ids[i * 7]], served.image_size)
        t0 = time.perf_counter()
        ask(served, image, questions[i * 7])
        t1 = time.perf_counter()
        r = phase(url, reqs[i % len(reqs) :], 1, 1, limit_s)
        if i < 3:  # warm-up
            continue
        base.append((t1 - t0) * 1e3)
        t_http += sum(r["client"]) / 1e3
        for k in ("sent", "errors"):
            http[k] += r[k]
        http["client"] += r["client"]
        http["server"] += r["server"]
    http["rps"] = len(http["client"]) / max(t_http, 1e-9)
    return base, http


def page_ready_ms(url: str, n: int = 5) -> list[float]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from vlmoe.serve.harness import chromium_driver

    driver = chromium_driver()
    out = []
    try:
        for _ in range(n):
            driver.get(url)
            body = WebDriverWait(driver, 30).until(
                lambda d: d.find_element(By.CSS_SELECTOR, "body[data-ready='1']")
            )
            out.append(float(body.get_attribute("data-ready-ms")))
    finally:
        driver.quit()
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per phase")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server and of the baseline (default: 1; 0 = torch's choice)",
    )
    ap.add_argument("--browser", action="store_true", help="also time the page in Chromium")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reqs = bodies(50)
    extra = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory() as logs, serve_process(args.checkpoint, extra, logs) as srv:
        phase(srv.url, reqs, 5, 1, 60)  # warm-up
        base, one = interleaved(srv.url, args.checkpoint, reqs, 50, args.time_limit)
        runs = [
            ("HTTP, 1 at a time", 1, one),
            (
                f"HTTP, {args.concurrency} at a time",
                args.concurrency,
                phase(srv.url, reqs, args.requests, args.concurrency, args.time_limit),
            ),
        ]
        ready = page_ready_ms(srv.url) if args.browser else []
        rss = peak_rss_mb(srv.proc.pid)
        traceback = "Traceback" in srv.stderr()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"checkpoint {args.checkpoint}; torch threads {args.threads or torch.get_num_threads()}; "
        f"server peak RSS {rss:.0f} MB; tracebacks: {traceback}; load average {' '.join(load)}"
    )
    head = "| path | conc. | requests | errors | client p50 | client p95 | server p50 | server p95 | req/s | p50 × baseline |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    b50 = statistics.median(base)
    print(
        f"| in-process ask() (baseline) | 1 | {len(base)} | 0 | {b50:.1f} | {pct(base, 0.95):.1f}"
        f" | – | – | {1e3 / b50:.0f} | 1.00× |"
    )
    for name, conc, r in runs:
        c50 = statistics.median(r["client"]) if r["client"] else float("nan")
        print(
            f"| {name} | {conc} | {r['sent']} | {r['errors']} | {c50:.1f} | "
            f"{pct(r['client'], 0.95):.1f} | {statistics.median(r['server']):.1f} | "
            f"{pct(r['server'], 0.95):.1f} | {r['rps']:.0f} | {c50 / b50:.2f}× |"
        )
    if ready:
        print(
            f"page ready after navigation (Chromium, {len(ready)} loads): median "
            f"{statistics.median(ready):.0f} ms, max {max(ready):.0f} ms"
        )
    failed = any(
        r["errors"] or r["sent"] < n for (_, _, r), n in zip(runs, (50, args.requests), strict=True)
    )
    return 1 if failed or traceback else 0


if __name__ == "__main__":
    sys.exit(main())

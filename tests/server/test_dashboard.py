"""/dashboard: the page is served, /dashboard/events streams the managers' memory maps, and what
they show agrees with the manager; in a real headless Chromium where one is installed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

import kvmem.engine.async_engine as async_engine_module
from kvmem.config import EngineConfig
from kvmem.server.dashboard import dashboard_state
from tests.server.conftest import TINY_ENGINE, start_server

PATIENCE = 120.0  # bound on every wait (a loaded machine is slow; a passing run takes seconds)
NUM_SHARERS = 7  # after one request caches the long prompt, seven more share its blocks


@pytest.fixture(scope="module")
def paged_server(tiny_model_dir):
    server = start_server(EngineConfig(model=str(tiny_model_dir), kv_cache="paged", **TINY_ENGINE))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def every_step_mapped(monkeypatch):
    """Every step publishes a map (not at most 10 per second), so a gated step sees its own."""
    monkeypatch.setattr(async_engine_module, "MEMORY_MAP_INTERVAL", 0.0)


class EventReader:
    """Reads /dashboard/events on a thread; keeps every state; `wait_for(pred)` returns the first
    state satisfying pred after the one it returned last, within PATIENCE."""

    def __init__(self, base_url: str) -> None:
        self.states: list[dict] = []
        self.cond = threading.Condition()
        self.stop = False
        self.error: BaseException | None = None
        self.next = 0  # index of the first state wait_for looks at
        self.thread = threading.Thread(target=self._run, args=(base_url,), daemon=True)
        self.thread.start()

    def _run(self, base_url: str) -> None:
        try:
            with httpx.stream("GET", f"{base_url}/dashboard/events", timeout=PATIENCE) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                for line in r.iter_lines():
                    if self.stop:
                        return
                    if line.startswith("data: "):
                        with self.cond:
                            self.states.append(json.loads(line[6:]))
                            self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported by wait_for
            self.error = e
            with self.cond:
                self.cond.notify_all()

    def wait_for(self, pred, what: str) -> dict:
        deadline = time.monotonic() + PATIENCE
        with self.cond:
            while True:
                for i in range(self.next, len(self.states)):
                    if pred(self.states[i]):
                        self.next = i + 1
                        return self.states[i]
                self.next = len(self.states)
                if self.error is not None:
                    raise AssertionError(f"the event stream failed: {self.error!r}")
                left = deadline - time.monotonic()
                assert left > 0, f"no state where {what} within {PATIENCE} s ({len(self.states)} states)"
                self.cond.wait(left)

    def close(self) -> None:
        self.stop = True


def long_prompt(server) -> list[int]:
    ids = server.engine.tokenizer.encode(" ".join(f"word{i}" for i in range(60)))
    return ids[:100] if len(ids) >= 100 else (ids * (100 // len(ids) + 1))[:100]


def complete(server, prompt: list[int], max_tokens: int) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=PATIENCE, json={
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text


class Gate:
    """Holds the engine before the first step that would run with NUM_SHARERS sequences running,
    until released; meanwhile the engine thread is parked, so the manager may be read. `at_gate`:
    the manager's stats and map there (taken on the engine thread)."""

    def __init__(self, server, monkeypatch) -> None:
        self.engine = server.engine.engine
        self.reached, self.released = threading.Event(), threading.Event()
        self.at_gate = None
        self.holding = False
        real_step = self.engine.step

        def gated_step():
            if self.holding:  # steps that do nothing until every sharer has arrived (the inbox is
                if len(self.engine.requests) < NUM_SHARERS:  # drained between them), so that they
                    time.sleep(0.005)  # run together however slowly their requests come in
                    return []
                self.holding = False
            if not self.released.is_set() and len(self.engine.scheduler.running) >= NUM_SHARERS:
                self.at_gate = (self.engine.manager.stats(), self.engine.manager.memory_map())
                self.reached.set()
                self.released.wait(PATIENCE)
            return real_step()

        monkeypatch.setattr(self.engine, "step", gated_step)

    def run_workload(self, server) -> list[threading.Thread]:
        """One request caches the long prompt; then NUM_SHARERS take it from the prefix cache at once."""
        prompt = long_prompt(server)
        complete(server, prompt, 2)
        self.holding = True
        threads = [threading.Thread(target=complete, args=(server, prompt, 6), daemon=True) for _ in range(NUM_SHARERS)]
        for t in threads:
            t.start()
        return threads


def check_counts_agree(state: dict, num_blocks: int) -> None:
    """Within one state, the map's block counts and the stats' bytes say the same."""
    m, s = state["map"], state["stats"]
    c, bb = m["counts"], m["block_bytes"]
    assert sum(c.values()) == len(m["states"]) == num_blocks
    assert (c["used"] + c["shared"]) * bb == s["bytes_allocated"]
    assert c["cached"] * bb == s["bytes_cached"]
    holders: dict[int, int] = {}
    for blocks in m["owners"].values():
        for b in blocks:
            holders[b] = holders.get(b, 0) + 1
    for b, code in enumerate(m["states"]):
        assert code == {0: "." if code != "c" else "c", 1: "u"}.get(holders.get(b, 0), "s"), (b, code)


# --- the page and the stream -----------------------------------------------------------------------
def test_dashboard_serves_the_page_and_its_assets(paged_server):
    r = httpx.get(f"{paged_server.base_url}/dashboard", timeout=PATIENCE)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/dashboard/dashboard.js" in r.text and "http" not in r.text.replace("http-equiv", "")  # offline
    for name, media in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        a = httpx.get(f"{paged_server.base_url}/dashboard/{name}", timeout=PATIENCE)
        assert a.status_code == 200 and a.headers["content-type"].startswith(media) and a.text
        assert "//cdn" not in a.text and "https://" not in a.text
    assert httpx.get(f"{paged_server.base_url}/dashboard/nope.js", timeout=PATIENCE).status_code == 404


def test_events_agree_with_the_manager_after_shared_prompt_workload(paged_server, monkeypatch):
    server, manager = paged_server, paged_server.engine.engine.manager
    num_blocks = manager.pool.num_blocks
    gate = Gate(server, monkeypatch)
    reader = EventReader(server.base_url)
    try:
        first = reader.wait_for(lambda s: True, "any state")  # an idle engine publishes at once
        assert first["map"]["kind"] == "blocks" and first["stats"]["strategy"] == "paged"
        check_counts_agree(first, num_blocks)
        threads = gate.run_workload(server)
        assert gate.reached.wait(PATIENCE), "the sharers never ran together"
        stats, m = gate.at_gate
        # The stream shows exactly the manager's picture at the gate (nothing ran since).
        shown = reader.wait_for(lambda s: s["map"]["states"] == m["states"] and s["map"]["owners"] == m["owners"],
                                "the map equals the manager's at the gate")
        check_counts_agree(shown, num_blocks)
        assert shown["stats"]["bytes_allocated"] == stats.bytes_allocated
        assert shown["stats"]["bytes_cached"] == stats.bytes_cached
        assert shown["num_running"] == NUM_SHARERS
        # The long prompt's full blocks are shared by all seven; each has its own last block.
        prefix_blocks = (len(long_prompt(server)) - 1) // manager.block_size
        owners = list(m["owners"].values())
        assert len(owners) == NUM_SHARERS and len({tuple(o[:prefix_blocks]) for o in owners}) == 1
        assert shown["map"]["counts"]["shared"] == prefix_blocks
        assert all(shown["map"]["states"][b] == "s" for b in owners[0][:prefix_blocks])
        assert shown["stats"]["prefix_hit_rate"] > 0
        assert sorted(shown["map"]["requests"]) == sorted(m["owners"])
        gate.released.set()
        for t in threads:
            t.join(PATIENCE)
        # Idle again: nothing allocated; the prompt's blocks are cached, as the manager says.
        idle = reader.wait_for(lambda s: s["num_running"] == 0 and s["num_waiting"] == 0
                               and s["stats"]["bytes_allocated"] == 0, "the engine is idle")
        check_counts_agree(idle, num_blocks)
        assert idle["map"]["counts"]["cached"] == manager.pool.num_free_cached >= prefix_blocks
        assert idle["stats"]["bytes_cached"] == manager.stats().bytes_cached
    finally:
        gate.released.set()
        reader.close()


def test_memory_map_is_taken_only_while_watched(paged_server):
    engine = paged_server.engine
    deadline = time.monotonic() + PATIENCE
    while engine.memory_map_watchers != 0:  # the previous test's stream has gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    engine.memory_map = None
    complete(paged_server, long_prompt(paged_server), 2)
    assert engine.memory_map is None


@pytest.mark.parametrize("kv_cache", ["static", "virtual", "hybrid"])
def test_every_strategy_has_a_json_memory_map(tiny_model_dir, kv_cache):
    """Each manager's map goes through the stream's JSON (offline engine; no server)."""
    from kvmem.engine.llm_engine import LLMEngine
    from kvmem.sampling_params import SamplingParams

    extra = {"max_model_len": 128} if kv_cache in ("static", "virtual") else {}
    try:
        engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache=kv_cache, **TINY_ENGINE, **extra))
    except (ValueError, OSError) as e:
        pytest.skip(f"kv_cache={kv_cache} not available here: {e}")
    try:
        engine.add_request({"prompt_token_ids": list(range(5, 45))}, SamplingParams(max_tokens=30, ignore_eos=True),
                           request_id="r")
        engine.step()
        engine.step()
        m = engine.manager.memory_map()
        assert m["strategy"] == kv_cache
        json.dumps(m)
        snap = async_engine_module.EngineSnapshot(time.time(), engine.stats(), 1, 1, 0, 0, 0, 0, 2)
        state = dashboard_state({"snapshot": snap, "map": m})
        json.dumps(state)
        if kv_cache == "static":
            live = [s["live"] for s in m["slots"] if s["seq"] is not None]
            assert len(live) == 1 and live[0] * engine.manager.spec.bytes_per_token == state["stats"]["bytes_live"]
            assert m["counts"]["used"] * m["slot_bytes"] == state["stats"]["bytes_allocated"]
        elif kv_cache == "virtual":
            rows = [r for r in m["slots"] if r["seq"] is not None]
            assert len(rows) == 1 and rows[0]["pages"].count(".") < len(rows[0]["pages"])
        else:
            assert m["kind"] == "hybrid" and "host" in m and len(m["states"]) > 0
    finally:
        engine.close()


# --- in a real browser -----------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    """Headless Chromium driven by selenium; only the system's browser and driver (apt's chromium and
    chromium-driver): nothing is downloaded."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver): "
                    "the browser test needs a system browser and never downloads one")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager: never fetch a driver or a browser
    profile = tempfile.mkdtemp(prefix="kvmem-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for errors
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as e:  # noqa: BLE001 - a browser that does not start is an environment problem
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium did not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    driver.set_page_load_timeout(PATIENCE)
    driver.kvmem_profile = profile
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(fn, what: str):
    deadline = time.monotonic() + PATIENCE
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"the page never showed {what} within {PATIENCE} s"
        time.sleep(0.05)


def test_page_in_chromium_shows_the_managers_blocks(paged_server, browser, monkeypatch, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    server, manager = paged_server, paged_server.engine.engine.manager
    gate = Gate(server, monkeypatch)
    browser.get(f"{server.base_url}/dashboard")
    wait_until(lambda: int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0) >= 1,
               "a first state")
    assert browser.find_element(By.ID, "strategy").text == "paged"
    threads = []
    try:
        threads = gate.run_workload(server)
        assert gate.reached.wait(PATIENCE), "the sharers never ran together"
        _, m = gate.at_gate

        def counts() -> dict[str, int]:  # read in one script: the page rebuilds them on every state
            return browser.execute_script(
                "return Object.fromEntries([...document.querySelectorAll('#counts b')]"
                ".map(b => [b.id.slice(6), Number(b.dataset.value)]))")

        # The page shows the manager's block counts at the gate (the engine is parked there).
        shown = wait_until(lambda: (c := counts()) == m["counts"] and c, f"the manager's counts {m['counts']}")
        assert shown["shared"] == (len(long_prompt(server)) - 1) // manager.block_size > 0
        assert shown["cached"] == manager.pool.num_free_cached
        assert shown["free"] == sum(1 for b in manager.pool.blocks if b.ref_count == 0 and b.block_hash is None)
        wait_until(lambda: browser.find_element(By.ID, "stat-running").text == str(NUM_SHARERS), "the running count")
        seqs = wait_until(lambda: browser.execute_script(
            "return [...document.querySelectorAll('#requests li[data-seq]')].map(li => li.dataset.seq)"), "the requests")
        assert sorted(seqs) == sorted(m["owners"])
        items = browser.find_elements(By.CSS_SELECTOR, "#requests li[data-seq]")  # the list is stable from here
        # Hovering a request highlights exactly its blocks; clicking keeps it highlighted.
        seq = items[0].get_attribute("data-seq")
        ActionChains(browser).move_to_element(items[0]).perform()
        canvas = browser.find_element(By.ID, "map")
        wait_until(lambda: canvas.get_attribute("data-highlighted") == str(len(m["owners"][seq])), "the highlight")
        items[0].click()
        ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
        wait_until(lambda: canvas.get_attribute("data-highlighted") == str(len(m["owners"][seq])),
                   "the clicked request's highlight")
        assert "selected" in browser.find_element(By.CSS_SELECTOR, f'#requests li[data-seq="{seq}"]').get_attribute("class")
        shot = Path(os.environ.get("KVMEM_DASHBOARD_SCREENSHOT", tmp_path / "dashboard-paged.png"))
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    finally:
        gate.released.set()
        for t in threads:
            t.join(PATIENCE)
    wait_until(lambda: browser.find_element(By.ID, "stat-running").text == "0", "the engine idle")


@pytest.mark.parametrize("kv_cache", ["static", "virtual"])
def test_page_in_chromium_draws_every_strategy(tiny_model_dir, browser, kv_cache):
    """Each strategy's picture is drawn without a script error, with a request in it."""
    from selenium.webdriver.common.by import By

    try:
        server = start_server(EngineConfig(model=str(tiny_model_dir), kv_cache=kv_cache, **TINY_ENGINE,
                                           max_model_len=128))
    except (ValueError, OSError) as e:
        pytest.skip(f"kv_cache={kv_cache} not available here: {e}")
    gate = threading.Event()
    engine = server.engine.engine
    real_step = engine.step

    def gated_step():  # park the engine once the request runs, so the page can see it
        if engine.scheduler.running:
            gate.wait(PATIENCE)
        return real_step()

    engine.step = gated_step
    thread = threading.Thread(target=complete, args=(server, list(range(5, 45)), 4), daemon=True)
    try:
        browser.get(f"{server.base_url}/dashboard")
        thread.start()
        wait_until(lambda: browser.execute_script(
            "return document.querySelectorAll('#requests li[data-seq]').length") == 1, "the request")
        assert browser.find_element(By.ID, "strategy").text == kv_cache
        assert browser.find_element(By.ID, "map-note").text
        assert browser.find_element(By.ID, "stat-running").text == "1"
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        if os.environ.get("KVMEM_DASHBOARD_SCREENSHOT"):
            browser.save_screenshot(str(Path(os.environ["KVMEM_DASHBOARD_SCREENSHOT"]).parent / f"dashboard-{kv_cache}.png"))
    finally:
        gate.set()
        thread.join(PATIENCE)
        server.stop()


# --- replay: a recording of `kvmem bench memory --record FILE` ---------------------------------------
@pytest.fixture(scope="module")
def replay_server(tmp_path_factory):
    """`kvmem dashboard --replay FILE`'s app on a free port, playing a small recording."""
    import sys

    import uvicorn

    from kvmem.bench.memory import MemoryBenchConfig, run_memory_benchmark
    from kvmem.bench.memory_sim import SimConfig
    from kvmem.bench.memory_stream import StreamConfig
    from kvmem.server.dashboard import replay_app
    from tests.server.conftest import free_port

    if not sys.platform.startswith("linux"):
        pytest.skip("the virtual strategy is Linux's mmap")
    path = tmp_path_factory.mktemp("replay") / "events.jsonl"
    run_memory_benchmark(MemoryBenchConfig(
        stream=StreamConfig(num_requests=30, prompt_median=60, output_median=30, max_prompt=200, max_output=64, seed=2),
        sim=SimConfig(budget_bytes=24 * 2**20, max_model_len=256, max_num_seqs=32, max_num_batched_tokens=512),
        run_latency=False, run_attention=False, progress=False, record=str(path), record_frames=10))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(replay_app(path), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the replay server up")
    yield f"http://127.0.0.1:{port}", path
    server.should_exit = True
    thread.join(30)


def test_replay_app_serves_the_page_and_the_recording(replay_server, tmp_path):
    from kvmem.server.dashboard import replay_app

    base, path = replay_server
    r = httpx.get(f"{base}/", timeout=PATIENCE)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard?replay=/dashboard/recording"
    assert httpx.get(f"{base}/dashboard/recording", timeout=PATIENCE).content == path.read_bytes()
    (tmp_path / "x.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not a kvmem memory recording"):
        replay_app(tmp_path / "x.jsonl")


def test_page_in_chromium_plays_a_recording(replay_server, browser):
    """Opened by `kvmem dashboard --replay`, the page plays every strategy of the recording, side by
    side step for step; any page can also open a recording from a file."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from kvmem.bench.memory_recording import read_recording

    base, path = replay_server
    _, frames = read_recording(path)
    browser.get(f"{base}/")
    wait_until(lambda: int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0) >= 3,
               "frames playing")
    labels = browser.execute_script("return [...document.querySelectorAll('#compare tr[data-label]')]"
                                    ".map(r => r.dataset.label)")
    assert labels == ["static", "paged", "virtual"]
    # Go to the virtual strategy's 5th frame (seeking pauses): the page shows exactly that frame.
    Select(browser.find_element(By.ID, "replay-label")).select_by_value("virtual")
    browser.execute_script("const k = document.getElementById('replay-seek'); k.value = 4;"
                           "k.dispatchEvent(new Event('input'));")
    frame = [f for f in frames if f["label"] == "virtual"][4]
    wait_until(lambda: browser.find_element(By.ID, "strategy").text == "virtual", "the virtual strategy")
    assert browser.find_element(By.ID, "replay-pos").text.startswith(f"step {frame['step']} ")
    assert browser.find_element(By.ID, "stat-running").text == str(frame["num_running"])
    assert browser.execute_script("return document.getElementById('count-mapped').dataset.value") == \
        str(frame["map"]["counts"]["mapped"])
    assert "chunk of" in browser.find_element(By.ID, "map-note").text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    if os.environ.get("KVMEM_DASHBOARD_SCREENSHOT"):
        browser.save_screenshot(str(Path(os.environ["KVMEM_DASHBOARD_SCREENSHOT"]).parent / "dashboard-replay.png"))

    # The file picker: a page with no ?replay (no live stream here) plays the file it is given.
    browser.get(f"{base}/dashboard")
    browser.find_element(By.ID, "replay-file").send_keys(str(path))
    wait_until(lambda: browser.find_element(By.ID, "conn").text == "replay: events.jsonl", "the file replaying")
    wait_until(lambda: browser.find_element(By.ID, "strategy").text == "static", "the first strategy")


def test_page_in_chromium_shows_hybrids_host_tier(tiny_model_dir, browser):
    """hybrid with a device tier of 6 blocks: requests that do not fit it run from the host tier (KV
    and activation blocks); clicking one outlines exactly its host blocks."""
    from selenium.webdriver.common.by import By

    server = start_server(EngineConfig(model=str(tiny_model_dir), kv_cache="hybrid", dtype="float32", max_num_seqs=64,
                                       max_model_len=128, kv_cache_memory=300_000, host_memory="2MiB", act_ratio=0.5))
    engine = server.engine.engine
    manager, real_step = engine.manager, engine.step
    gate, parked = threading.Event(), threading.Event()

    def gated_step():  # park once two sequences run from the host tier, so the page can see them
        if len(manager.host_tables) >= 2 and len(engine.scheduler.running) >= 3 and not gate.is_set():
            parked.set()
            gate.wait(PATIENCE)
        return real_step()

    engine.step = gated_step
    threads = [threading.Thread(target=complete, args=(server, list(range(5 + i, 65 + 5 * i)), 40), daemon=True)
               for i in range(6)]
    try:
        browser.get(f"{server.base_url}/dashboard")
        wait_until(lambda: int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0) >= 1,
                   "a first state")
        for t in threads:
            t.start()
        assert parked.wait(PATIENCE), "no two sequences ever ran from the host tier"
        host = {str(sid): len(table) for sid, table in manager.host_tables.items()}
        seq = sorted(host)[0]
        # Read in one script: until the page has the parked state it rebuilds the list on each update, and
        # an element found before a rebuild is stale by the click. Parked, the list stays put.
        wait_until(lambda: (t := browser.execute_script(
            f"const li = document.querySelector('#requests li[data-seq=\"{seq}\"]'); return li && li.textContent;"))
            and "tier: host" in t and f"{host[seq]} host blocks" in t, "the host-resident request")
        browser.find_element(By.CSS_SELECTOR, f'#requests li[data-seq="{seq}"]').click()
        canvas = browser.find_element(By.ID, "map")
        wait_until(lambda: canvas.get_attribute("data-highlighted") == str(host[seq]), "its host blocks outlined")
        assert "host tier" in browser.find_element(By.ID, "map-note").text
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        if os.environ.get("KVMEM_DASHBOARD_SCREENSHOT"):
            browser.save_screenshot(str(Path(os.environ["KVMEM_DASHBOARD_SCREENSHOT"]).parent / "dashboard-hybrid.png"))
    finally:
        gate.set()
        for t in threads:
            t.join(PATIENCE)
        server.stop()

"""Tests the web chat page as a person would use it, in headless Chromium driven over the DevTools protocol
(--remote-debugging-pipe: NUL-separated JSON on file descriptors 3 and 4, no extra packages).

Usage: web_chat.py PAGE_URL MESSAGE SCREENSHOT.png
Loads the page, types MESSAGE into the box, presses Enter, waits until the streamed answer is complete, saves a
screenshot and prints {"reply": ..., "states": [...]} as JSON, where states are the reply lengths seen while
it streamed.
"""
import base64
import json
import os
import shutil
import subprocess
import sys
import time

url, message, shot = sys.argv[1:4]
browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
if not browser:
    sys.exit("web_chat.py: no chromium on PATH (Debian: apt-get install chromium)")

to_chrome_r, to_chrome_w = os.pipe()
from_chrome_r, from_chrome_w = os.pipe()


def to_fds_3_and_4():
    # Chromium reads commands on fd 3 and writes answers on fd 4. Duplicate first so that neither dup2 clobbers
    # the other pipe end when it already sits on 3 or 4.
    r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)
    os.dup2(r, 3)
    os.dup2(w, 4)


proc = subprocess.Popen(
    [browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--window-size=1000,720",
     "--no-first-run", "--user-data-dir=" + os.path.join(os.path.dirname(os.path.abspath(shot)), "chromium-profile"),
     "about:blank"],
    pass_fds=(3, 4),
    preexec_fn=to_fds_3_and_4,
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
os.close(to_chrome_r)
os.close(from_chrome_w)
inbox = b""
next_id = 0


def call(method, params=None, session=None, timeout=60):
    global next_id, inbox
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    os.write(to_chrome_w, json.dumps(msg).encode() + b"\0")
    deadline = time.time() + timeout
    while time.time() < deadline:
        while b"\0" in inbox:
            raw, inbox = inbox.split(b"\0", 1)
            m = json.loads(raw)
            if m.get("id") == next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
        chunk = os.read(from_chrome_r, 1 << 20)
        if not chunk:
            raise RuntimeError("chromium exited")
        inbox += chunk
    raise TimeoutError(method)


def js(expr, session):
    r = call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True}, session)
    return r["result"].get("value")


try:
    target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
    s = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    call("Page.enable", session=s)
    call("Page.navigate", {"url": url}, session=s)
    for _ in range(100):
        if js("document.readyState", s) == "complete" and js("!!document.getElementById('input')", s):
            break
        time.sleep(0.1)
    js("document.getElementById('input').focus()", s)
    call("Input.insertText", {"text": message}, session=s)
    call("Input.dispatchKeyEvent",
         {"type": "keyDown", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13},
         session=s)
    call("Input.dispatchKeyEvent",
         {"type": "keyUp", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13},
         session=s)
    states = []
    reply = None
    deadline = time.time() + 120
    while time.time() < deadline:
        st = js("""(() => { const a = document.querySelector('.msg.assistant');
                  if (!a) return null;
                  return {done: a.dataset.done, text: a.firstChild ? a.firstChild.textContent : ''}; })()""", s)
        if st:
            if not states or states[-1] != len(st["text"]):
                states.append(len(st["text"]))
            if st["done"] == "true":
                reply = st["text"]
                break
        time.sleep(0.02)
    errors = js("[...document.querySelectorAll('.msg.error')].map(e => e.textContent)", s)
    png = call("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
    with open(shot, "wb") as f:
        f.write(base64.b64decode(png))
    print(json.dumps({"reply": reply, "states": states, "errors": errors,
                      "user": js("document.querySelector('.msg.user') && document.querySelector('.msg.user').textContent", s)}))
finally:
    try:
        call("Browser.close", timeout=5)
    except Exception:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()

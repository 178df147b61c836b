"""Time from the end of a spoken request to the first audible frame of the reply, through
voxloop's browser page in headless Chromium and through the PyPI xiaozhi-sdk device simulator,
against the same running `voxloop serve` (benches/browser.rs runs both, side by side).

    python latency.py page PAGE_URL WAV SPEECH_MS RUNS
    python latency.py sdk WS_URL WAV SPEECH_MS RUNS

WAV is the request then silence (the page's fake microphone plays it in a loop); SPEECH_MS is
where the request's recording ends in it. End of speech: for the page, the moment the fake
microphone reached SPEECH_MS (its first 60 ms frame marks the file's start); for the SDK, the
moment it sent the frame that ends at SPEECH_MS (frames go out at real-time pace). First audible
frame: for the page, when its first decoded frame is scheduled to play; for the SDK, when its
first decoded reply frame is queued. Each run ends the reply (Stop, `abort`) before the next.
Prints one JSON object: {"latency_ms": [...]} for the runs.
"""

import asyncio
import json
import sys
import time
import wave

FRAME_MS = 60


def page(url: str, wav: str, speech_ms: float, runs: int) -> list:
    from browser import browser, click, stats, wait

    latencies = []
    driver = browser(wav)
    try:
        for _ in range(runs):
            driver.get(url)
            wait(driver, "the page ready", lambda: stats(driver).get("state") == "idle", 30)
            click(driver, "talk")
            seen = wait(driver, "the first audible frame",
                        lambda: stats(driver) if stats(driver).get("firstAudioMs") else None, 120)
            end_of_speech = seen["captureStartMs"] - FRAME_MS + speech_ms
            latencies.append(seen["firstAudioMs"] - end_of_speech)
            click(driver, "stop")
            time.sleep(0.5)
    finally:
        driver.quit()
    return latencies


async def sdk(url: str, wav_path: str, speech_ms: float, runs: int) -> list:
    from xiaozhi_sdk import XiaoZhiWebsocket

    stopped = asyncio.Event()

    async def on_message(message: dict) -> None:
        if message.get("type") == "tts" and message.get("state") == "stop":
            stopped.set()

    device = XiaoZhiWebsocket(on_message, url=url, audio_sample_rate=16000, audio_frame_duration=FRAME_MS)
    if not await device.init_connection("02:00:00:00:00:0b"):
        raise SystemExit("the SDK could not connect")
    with wave.open(wav_path, "rb") as wav:
        frame = 16000 * FRAME_MS // 1000
        frames = []
        while True:
            pcm = wav.readframes(frame)
            if not pcm:
                break
            frames.append(pcm.ljust(frame * 2, b"\0"))
    speech_frames = int(round(speech_ms / FRAME_MS))
    latencies = []
    for _ in range(runs):
        stopped.clear()
        before = len(device.output_audio_queue)
        start = time.monotonic()
        end_of_speech = None
        first = None
        i = 0
        # The request then its silence, at real-time pace, until the reply is heard.
        while first is None:
            due = start + i * FRAME_MS / 1000
            # Look for the reply every 5 ms until the next frame is due.
            while first is None and time.monotonic() < due:
                if end_of_speech is not None and len(device.output_audio_queue) > before:
                    first = time.monotonic()
                await asyncio.sleep(0.005)
            if first is not None:
                break
            await device.send_audio(frames[i] if i < len(frames) else b"\0" * (frame * 2))
            i += 1
            if i == speech_frames:
                end_of_speech = time.monotonic()
            if time.monotonic() - start > 120:
                raise SystemExit("no reply within 120 s")
        latencies.append((first - end_of_speech) * 1000)
        await device.send_abort()
        await asyncio.wait_for(stopped.wait(), timeout=30)
        await asyncio.sleep(0.5)
    await device.close()
    return latencies


def main() -> None:
    mode, url, wav, speech_ms, runs = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    if mode == "page":
        latencies = page(url, wav, speech_ms, runs)
    elif mode == "sdk":
        latencies = asyncio.run(sdk(url, wav, speech_ms, runs))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps({"latency_ms": latencies}))


if __name__ == "__main__":
    main()

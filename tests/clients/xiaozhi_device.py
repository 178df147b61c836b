"""A smart speaker played by the PyPI `xiaozhi-sdk` (0.5.1), a third-party implementation of the
xiaozhi device side, against a running voxloop device server.

    python xiaozhi_device.py OTA_URL MAC WAV

The SDK does its own OTA check (and, when the answer carries an activation, connects with the
pending token and polls `{ota}/activate` until the owner approves); the script then waits for
the activation, says WAV (16 kHz mono 16-bit) as 60 ms frames followed by silence, and waits for
the reply's `tts stop`. The device offers one MCP tool, `self.lamp.turn_on`. It prints one JSON
object: the messages it got, whether the tool was called, the reply's length (ms) and peak
level (16-bit PCM as the SDK decoded it), and what
`initialize` carried (`capabilities.vision`). Any failure is an exception and a non-zero exit.
"""

import asyncio
import json
import sys
import time
import wave

from xiaozhi_sdk import XiaoZhiWebsocket


async def main() -> None:
    ota_url, mac, wav_path = sys.argv[1:4]
    events: list[dict] = []
    tool_calls: list[dict] = []
    done = asyncio.Event()
    replied = asyncio.Event()
    speaking = asyncio.Event()
    asking = asyncio.Event()

    async def on_message(message: dict) -> None:
        events.append(message)
        kind, state = message.get("type"), message.get("state")
        # Only the turn of the spoken request counts (not the "hi" the SDK says on connect,
        # whose `tts stop` may still come after the request was heard).
        if asking.is_set() and kind == "stt":
            replied.set()
        # The reply's first sentence (a turn cancelled before speaking sends start and stop only).
        if replied.is_set() and kind == "tts" and state == "sentence_start":
            speaking.set()
        if speaking.is_set() and kind == "tts" and state == "stop":
            done.set()

    def turn_on(arguments: dict):
        tool_calls.append(arguments)
        return {"lamp": "on"}, False

    device = XiaoZhiWebsocket(
        on_message, ota_url=ota_url, audio_sample_rate=16000, audio_frame_duration=60
    )
    await device.set_mcp_tool(
        [
            {
                "name": "self.lamp.turn_on",
                "description": "Turn the desk lamp on.",
                "inputSchema": {"type": "object", "properties": {}},
                "tool_func": turn_on,
            }
        ]
    )
    if not await device.init_connection(mac):
        raise SystemExit("the SDK could not connect")
    activation = device.wait_device_activated
    deadline = time.monotonic() + 90
    while device.wait_device_activated:
        if time.monotonic() > deadline:
            raise SystemExit("not activated within 90 s")
        await asyncio.sleep(0.2)
    # The SDK says "hi" on connect (and again after an activation): let that turn finish.
    await asyncio.sleep(3.0)
    before = len(device.output_audio_queue)
    asking.set()
    with wave.open(wav_path, "rb") as wav:
        assert wav.getframerate() == 16000 and wav.getnchannels() == 1, "16 kHz mono WAV"
        frame = 16000 * 60 // 1000
        while True:
            pcm = wav.readframes(frame)
            if not pcm:
                break
            pcm = pcm.ljust(frame * 2, b"\0")
            await device.send_audio(pcm)
            await asyncio.sleep(0.01)
    await device.send_silence_audio(2.0)
    await asyncio.wait_for(done.wait(), timeout=120)
    # The SDK queues one row of decoded PCM per downlink frame (60 ms here).
    frames = list(device.output_audio_queue)[before:]
    peak = max((int(abs(row.astype("int32")).max()) for row in frames), default=0)
    await device.close()
    print(
        json.dumps(
            {
                "activated_by_owner": activation,
                "vision_url": device.explain_url,
                "vision_token_given": bool(device.explain_token),
                "messages": [
                    {k: v for k, v in e.items() if k in ("type", "state", "text", "emotion")}
                    for e in events
                ],
                "tool_calls": tool_calls,
                "reply_ms": len(frames) * 60,
                "reply_peak": peak,
            }
        )
    )


asyncio.run(main())

"""A faithful HTTP fake of KIE.AI's Suno "Upload And Extend Audio" provider (demos, tests, benchmarks).

Routes: `POST /api/v1/generate/upload-extend`, `GET /api/v1/generate/record-info?taskId=`,
`GET /api/v1/chat/credit`, the createTask route (`POST /api/v1/jobs/createTask`,
`GET /api/v1/jobs/recordInfo?taskId=`, same task engine), `POST /api/file-{stream,base64,url}-upload`,
`GET /uploads/<filePath>`,
`GET /files/source/<N>s.mp3` (a short real MP3 whose nominal duration is N seconds), the takes' files
under `/files/...`, and the control routes `GET /_sim/stats`, `POST /_sim/reset`, `GET|POST /_sim/config`.
Knobs: `SimConfig` (env `KIE_SIM_<KNOB>`, CLI `--knob-name`). State lives in memory unless a state file is
given (`--state-file`, env `KIE_SIM_STATE_FILE`; module `state`): then a restarted simulator still knows its tasks.
"""

from kie_extend.simulator.audio import audio_duration, mp3_bytes, mp3_duration, png_bytes, wav_bytes
from kie_extend.simulator.callbacks import sign
from kie_extend.simulator.cli import main
from kie_extend.simulator.config import SimConfig
from kie_extend.simulator.core import Simulator
from kie_extend.simulator.protocol import SimReply, SimRequest
from kie_extend.simulator.server import SimServer, serve

__all__ = [
    "SimConfig",
    "SimReply",
    "SimRequest",
    "SimServer",
    "Simulator",
    "audio_duration",
    "main",
    "mp3_bytes",
    "mp3_duration",
    "png_bytes",
    "serve",
    "sign",
    "wav_bytes",
]

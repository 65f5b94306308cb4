"""Voices: MODEL_PATH serving several model files, each chat's /voice kept in the database and used for its
speeches, buttons, daily posts, interjections and (by the user's private chat) inline mode; naming voices
with `python -m export`; `python -m bot generate --voice`.

The second voice is a tiny network of a corpus of owls' hoots (conftest's hooting_voice): whatever it
writes has no letter but those of "Boo Woo Oh", so a speech shows which voice wrote it.
"""

from __future__ import annotations

import random
import shutil
from datetime import time, timedelta
from pathlib import Path

import pytest

from bot.__main__ import main as bot_main
from bot.config import Config, ConfigError, model_files
from bot.core.speech import Speech
from bot.core.speechbot import ChatRef
from bot.inference.modelfile import MetadataError, cuda_twin, parse_props, voice_name_from_file
from bot.inference.runner import read_model_info, serving_path
from bot.services import Services, build_services, close_engines, open_voices
from export.__main__ import main as export_main
from model.sampling import bot_sampling
from tests.conftest import HOOTING_CORPUS
from tests.support.bot_harness import ALICE, BOB, Clock, bot_config, group_chat, private_chat, running_bot
from tests.test_bot_scheduling import daily_job

PRIVATE = ChatRef(7, "private")
OTHER = ChatRef(8, "private")
GROUP = ChatRef(-70, "group")


def hooted(text: str) -> bool:
    """Written by the hooting voice: letters, all of them its corpus's."""
    letters = {c for c in text if c.isalpha()}
    return bool(letters) and letters <= set(HOOTING_CORPUS)


async def refuse() -> bool:
    return False


def config_for(tmp_path: Path, *models: Path) -> Config:
    return Config(
        database_url=f"sqlite:///{tmp_path / 'bot.db'}",
        model_paths=models,
        onnx_providers="cpu",
        onnx_threads=1,
        onnx_lanes=1,
        default_length=60,
        cooldown_seconds=0,
    )


@pytest.fixture
def two_voices(tmp_path, tiny_int8, hooting_voice):
    opened: list[Services] = []

    def start(*models: Path) -> Services:
        services = build_services(config_for(tmp_path, *(models or (tiny_int8, hooting_voice))))
        opened.append(services)
        return services

    yield start
    for services in opened:
        services.close()


# ---- MODEL_PATH ----


def test_model_path_names_files_and_folders(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    for name in ("b.onnx", "a.onnx", "a-cuda.onnx", "notes.txt", "lonely-cuda.onnx"):
        (folder / name).write_bytes(b"")
    # A folder stands for its .onnx files by name; a CUDA twin beside its file is left out (served on CUDA).
    expected = (folder / "a.onnx", folder / "b.onnx", folder / "lonely-cuda.onnx")
    assert model_files(str(folder)) == expected
    assert Config.from_env({"MODEL_PATH": f"first.onnx:{folder}"}, dotenv_path=tmp_path / "none").model_paths == (
        Path("first.onnx"),
        *expected,
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"the folder .*empty, which holds no .onnx model files"):
        model_files(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="more than once"):
        model_files(f"{folder}:{folder / 'a.onnx'}")
    with pytest.raises(ConfigError, match="names no model file"):
        model_files(" : ")


def test_a_voice_name_comes_from_the_metadata_or_the_file_name(tiny_int8, hooting_voice):
    assert read_model_info(hooting_voice)[1].voice_name == "hoot"
    assert read_model_info(tiny_int8)[1].voice_name is None
    assert voice_name_from_file(tiny_int8) == "tiny-int8"
    assert voice_name_from_file(Path("My Big Model!.onnx")) == "my-big-model"


def test_any_file_with_a_cuda_twin_beside_it_is_served_as_the_twin_on_cuda(tmp_path, tiny_int8, tiny_onnx):
    int8 = shutil.copy(tiny_int8, tmp_path / "mine.onnx")
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert serving_path(int8, "cuda", cuda) == Path(int8), "no twin yet"
    shutil.copy(tiny_onnx, cuda_twin(Path(int8)))
    assert serving_path(int8, "cuda", cuda) == tmp_path / "mine-cuda.onnx"
    assert serving_path(int8, "auto", cuda) == tmp_path / "mine-cuda.onnx"
    assert serving_path(int8, "cpu", cuda) == Path(int8)
    assert serving_path(int8, "auto", ["CPUExecutionProvider"]) == Path(int8)


def test_two_files_with_one_voice_name_are_refused_naming_both(tmp_path, tiny_int8):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        shutil.copy(tiny_int8, tmp_path / folder / "same.onnx")
    config = config_for(tmp_path, tmp_path / "x" / "same.onnx", tmp_path / "y" / "same.onnx")
    with pytest.raises(ConfigError, match=r"two voices named 'same' \(.*x/same.onnx and .*y/same.onnx\)"):
        open_voices(config)


# ---- the core ----


async def test_each_chat_speaks_in_the_voice_it_picked(two_voices):
    core = two_voices().core
    listing = await core.handle_text(PRIVATE, "/voice")
    assert listing.startswith("This chat's voice: tiny-int8.")
    assert "• tiny-int8" in listing and "◦ hoot: Owls only." in listing
    assert not hooted(await core.handle_text(PRIVATE, "/speech")), "the default voice is the first file's"

    assert await core.handle_text(PRIVATE, "/voice HOOT") == "Voice set to hoot. Owls only."
    assert "• hoot" in await core.handle_text(PRIVATE, "/voice")
    for text in ("/speech", "/speech 1.2", "We will", "/speech 0.3 We will"):
        reply = await core.handle_text(PRIVATE, text)
        assert isinstance(reply, Speech) and hooted(reply.removeprefix("We will")), (text, reply)
    choice = await core.choice(PRIVATE, "speech:1.4")
    assert hooted(choice), "the buttons under a speech use the chat's voice"
    assert not hooted(await core.handle_text(OTHER, "/speech")), "another chat keeps the default"
    assert "voice: hoot" in await core.handle_text(PRIVATE, "/settings")
    assert "voice: hoot" in await core.handle_text(PRIVATE, "/stats")


async def test_bad_voice_names_and_non_admins_are_refused(two_voices):
    core = two_voices().core
    reply = await core.handle_text(GROUP, "/voice loud")
    assert reply == "I have no voice called 'loud'. My voices: tiny-int8, hoot; e.g. /voice hoot."
    refused = await core.handle_text(GROUP, "/voice hoot", check_admin=refuse)
    assert "only this group's administrators" in refused
    assert "• tiny-int8" in await core.handle_text(GROUP, "/voice", check_admin=refuse), "everyone may look"
    assert not hooted(await core.handle_text(GROUP, "/speech"))


async def test_a_voice_survives_a_restart_and_a_missing_file_falls_back_to_the_default(
    two_voices, tiny_int8, hooting_voice
):
    first = two_voices()
    await first.core.handle_text(GROUP, "/voice hoot")
    first.close()
    again = two_voices(hooting_voice, tiny_int8)  # the operator reordered MODEL_PATH: hoot is now the default
    assert hooted(await again.core.handle_text(GROUP, "/speech"))
    assert await again.core.handle_text(PRIVATE, "/voice tiny-int8") == "Voice set to tiny-int8."
    assert not hooted(await again.core.handle_text(PRIVATE, "/speech"))
    again.close()
    one = two_voices(tiny_int8)  # hoot's file is gone
    assert "voice: tiny-int8 (its voice hoot is no longer served)" in await one.core.handle_text(GROUP, "/settings")
    assert not hooted(await one.core.handle_text(GROUP, "/speech"))
    assert await one.core.handle_text(GROUP, "/voice") == (
        "This chat's voice: tiny-int8 (its voice hoot is no longer served). It is the only voice I have."
    )


async def test_daily_posts_interjections_and_inline_speeches_use_the_chosen_voice(two_voices):
    services = two_voices()
    core = services.core
    core.chatter.rng = random.Random(1)
    await core.handle_text(GROUP, "/voice hoot")
    await core.handle_text(GROUP, "/chatter 1/2")  # Random(1)'s first draw is a hit
    interjection = await core.overheard(GROUP, "What do you think?")
    assert interjection is not None and hooted(interjection)
    settings = await services.store.update(GROUP.id, daily_time=time(8), schedule_enabled=True)
    assert hooted(await core.daily_speech(settings))

    # Inline queries come from a user, not a chat: they use the voice of the user's private chat with the bot.
    assert not any(hooted(speech.text) for speech in await core.inline_speeches(PRIVATE.id, "We will"))
    await core.handle_text(PRIVATE, "/voice hoot")
    speeches = await core.inline_speeches(PRIVATE.id, "Boo")
    assert speeches and all(hooted(speech.text) for speech in speeches)


async def test_forget_deletes_the_voice_with_the_chat(two_voices):
    core = two_voices().core
    await core.handle_text(PRIVATE, "/voice hoot")
    await core.handle_text(PRIVATE, "/forget yes")
    assert "voice: tiny-int8" in await core.handle_text(PRIVATE, "/stats")


async def test_voice_over_telegram_admins_pick_and_everyone_hears_it(emulator, tmp_path, tiny_int8, hooting_voice):
    voices = open_voices(config_for(tmp_path, tiny_int8, hooting_voice))
    group = group_chat(-500)
    emulator.admins[group["id"]] = [ALICE]
    try:
        async with running_bot(emulator, voices, bot_config(emulator, tmp_path / "tg.db"), Clock()):
            assert "only this group's administrators" in await emulator.ask(group, BOB, "/voice hoot")
            assert await emulator.ask(group, ALICE, "/voice hoot") == "Voice set to hoot. Owls only."
            assert hooted(await emulator.ask(group, BOB, "/speech"))
            assert not hooted(await emulator.ask(private_chat(BOB), BOB, "/speech")), "Bob's own chat: the default"
    finally:
        close_engines(voices)


async def test_a_daily_post_over_telegram_is_in_the_chats_voice(emulator, tmp_path, tiny_int8, hooting_voice):
    voices = open_voices(config_for(tmp_path, tiny_int8, hooting_voice))
    chat, clock = private_chat(ALICE), Clock()
    try:
        async with running_bot(emulator, voices, bot_config(emulator, tmp_path / "tg.db"), clock) as application:
            await emulator.ask(chat, ALICE, "/voice hoot")
            await emulator.ask(chat, ALICE, f"/schedule {clock.now + timedelta(minutes=30):%H:%M}")
            clock.advance(minutes=30)
            before = len(emulator.sent(chat_id=chat["id"]))
            await daily_job(application, chat["id"]).run(application)
            post = emulator.sent(chat_id=chat["id"])[before:]
            assert len(post) == 1 and hooted(post[0].params["text"]), post
    finally:
        close_engines(voices)


def test_a_voice_can_keep_its_hot_speeches_readable_with_a_min_p_floor(tmp_path, tiny_int8, capsys):
    assert bot_sampling(2.0).min_p == pytest.approx(0.025), "the bot's own schedule"
    assert bot_sampling(2.0, 0.05).min_p == 0.05 and bot_sampling(0.9, 0.05).min_p == 0.1, "a floor, not a ceiling"
    floored = tmp_path / "floored.onnx"
    export_main(["voice", str(tiny_int8), "--min-p-floor", "0.05", "-o", str(floored)])
    assert read_model_info(floored)[1].min_p_floor == 0.05 and read_model_info(tiny_int8)[1].min_p_floor == 0.0
    voices = open_voices(config_for(tmp_path, tiny_int8, floored))
    try:
        assert [voice.min_p_floor for voice in voices] == [0.0, 0.05]
        assert [voice.sampling(2.0).min_p for voice in voices] == [pytest.approx(0.025), 0.05]
    finally:
        close_engines(voices)
    with pytest.raises(SystemExit):
        export_main(["voice", str(floored), "--min-p-floor", "0.5"])
    assert "--min-p-floor: min_p_floor '0.5' is not a number from 0 to 0.1" in capsys.readouterr().err
    with pytest.raises(MetadataError, match="min_p_floor 'high' is not a number"):
        parse_props(read_model_info(floored)[1].to_props() | {"min_p_floor": "high"})


# ---- the command lines ----


def test_export_voice_names_a_model_file_and_refuses_bad_names(tmp_path, tiny_int8, capsys):
    renamed = tmp_path / "renamed.onnx"
    export_main(["voice", str(tiny_int8), "--voice-name", "calm", "--voice-description", "Slow.", "-o", str(renamed)])
    assert f"wrote {renamed}: voice calm, Slow." in capsys.readouterr().out
    info = read_model_info(renamed)[1]
    assert (info.voice_name, info.voice_description) == ("calm", "Slow.")
    assert info.vocab == read_model_info(tiny_int8)[1].vocab, "the network is the same"
    export_main(["voice", str(renamed)])
    assert capsys.readouterr().out == "voice: calm\ndescription: Slow.\nmin-p floor: (none: the bot's schedule alone)\n"
    with pytest.raises(SystemExit) as exit_info:
        export_main(["voice", str(renamed), "--voice-name", "Big Voice"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--voice-name: voice_name 'Big Voice' is not valid: use 1-32 of a-z 0-9 _ -" in error
    assert read_model_info(renamed)[1].voice_name == "calm", "nothing was written"


def test_generate_speaks_in_the_voice_asked_for(tmp_path, monkeypatch, capsys, tiny_int8, hooting_voice):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL_PATH", f"{tiny_int8}:{hooting_voice.parent}")
    monkeypatch.setenv("ONNX_PROVIDERS", "cpu")
    monkeypatch.setenv("ONNX_LANES", "1")
    assert bot_main(["generate", "--voice", "hoot", "--length", "60", "--seed", "3"]) == 0
    assert hooted(capsys.readouterr().out)
    assert bot_main(["generate", "--length", "60", "--seed", "3"]) == 0
    assert not hooted(capsys.readouterr().out), "the first voice by default"
    assert bot_main(["generate", "--voice", "calm"]) == 2
    assert "--voice 'calm' is not one of the voices MODEL_PATH serves: tiny-int8, hoot" in capsys.readouterr().err

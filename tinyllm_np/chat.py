"""Chat with a trained TinyLLM.

    python chat.py                              # interactive; /help for commands
    python chat.py --prompt "Hello!" --greedy   # one answer on stdout, then exit

Each exchange is written in the training format
``<|user|>message<|bot|>reply<|end|>`` (one per line); the model writes the reply
until it produces ``<|end|>``.  Earlier exchanges stay in the prompt while they
fit in the model's 128-character window, oldest dropped first.  Past 128
characters the window slides (``--slide``, see generate.py): by 64 characters by
default, by 1 for the original's always-the-last-128.
"""

import os
import sys

import numpy as np

from .cli import EXIT_USAGE, OneLineParser, stdout_gone
from .generate import check_slide, generate
from .weights import WeightsError, load_model
from .tokenizer import BOT, END, USER, CharTokenizer

# a reply ends at <|end|>; <|user|> or <|bot|> would mean it ran on into a new turn (a weakly trained
# model writes a literal <|bot|> mid-reply)
STOP_MARKERS = (END, USER, BOT)
HELP = """commands:
  /reset   forget the conversation so far
  /help    show this help
  /quit    leave (Ctrl-D and Ctrl-C work too)"""


def default_weights():
    """The shipped weights: weights/tinyllm.npz in the source checkout this package runs from,
    else the copy a regular ``pip install`` puts in <prefix>/share/tinyllm-np/, else
    weights/tinyllm.npz in the current directory (whose absence the loader reports)."""
    for path in (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "tinyllm.npz"),
                 os.path.join(sys.prefix, "share", "tinyllm-np", "tinyllm.npz")):
        if os.path.exists(path):
            return path
    return os.path.join("weights", "tinyllm.npz")


class StopFilter:
    """Streams text while holding back anything that could be the start of a stop marker."""

    def __init__(self, markers=STOP_MARKERS):
        self.markers = markers
        self.pending = ""
        self.stopped = False

    def feed(self, ch):
        """Add one character; returns the text that is now safe to show."""
        self.pending += ch
        for m in self.markers:
            i = self.pending.find(m)
            if i >= 0:
                self.stopped = True
                out, self.pending = self.pending[:i], ""
                return out
        for i in range(len(self.pending)):  # keep the shortest tail that may still become a marker
            tail = self.pending[i:]
            if any(m.startswith(tail) for m in self.markers):
                out, self.pending = self.pending[:i], tail
                return out
        out, self.pending = self.pending, ""
        return out


class ChatSession:
    """Conversation state and the prompt it implies."""

    def __init__(self, model, temperature=0.7, top_k=None, greedy=False, seed=None, max_new_tokens=300,
                 slide=None):
        if model.chars is None:
            raise WeightsError("the weights file has no vocabulary ('__chars__'); cannot chat with it")
        self.model = model
        self.tok = CharTokenizer(model.chars)
        missing = sorted(set(USER + BOT + END) - set(model.chars))
        if missing:
            raise WeightsError(f"the vocabulary lacks {''.join(missing)!r}, needed for the chat format")
        self.temperature, self.top_k, self.greedy = temperature, top_k, greedy
        self.max_new_tokens = max_new_tokens
        self.slide = check_slide(slide, model.config.context)  # ValueError if out of range
        self.rng = np.random.default_rng(seed)
        self.history = []  # (user, reply) pairs
        self.context = model.config.context
        self.reserve = self.context // 4  # room kept free for the start of the reply

    def reset(self):
        self.history = []

    def clean(self, message):
        """The message with characters outside the vocabulary removed, and the ones removed."""
        bad = self.tok.unknown(message)
        if bad:
            message = "".join(c for c in message if c in self.tok.stoi)
        return message, bad

    def prompt(self, message):
        """Recent exchanges that fit (oldest dropped first), then this message and <|bot|>."""
        turn = f"{USER}{message}{BOT}"
        kept = []
        size = len(turn)
        for user, reply in reversed(self.history):
            past = f"{USER}{user}{BOT}{reply}{END}\n"
            if size + len(past) > self.context - self.reserve:
                break
            kept.append(past)
            size += len(past)
        return "".join(reversed(kept)) + turn

    def reply(self, message, emit=None):
        """Generate the reply to message, passing each safe-to-show piece to emit()."""
        ids = self.tok.encode(self.prompt(message))
        filt = StopFilter()
        parts = []
        try:
            for t in generate(self.model, ids, self.max_new_tokens, self.temperature, self.top_k,
                              self.greedy, self.rng, slide=self.slide):
                piece = filt.feed(self.tok.chars[t])
                if piece:
                    parts.append(piece)
                    if emit:
                        emit(piece)
                if filt.stopped:
                    break
        except KeyboardInterrupt:
            raise  # the caller decides; nothing is added to the history
        text = "".join(parts)
        if not filt.stopped and filt.pending and emit:
            emit(filt.pending)  # ran out of tokens: show what was held back
            text += filt.pending
        self.history.append((message, text))
        return text


def build_parser():
    ap = OneLineParser(prog="chat.py", description="Chat with TinyLLM (NumPy).")
    ap.add_argument("--weights", default=None, help="weights .npz (default: weights/tinyllm.npz)")
    ap.add_argument("--prompt", default=None, help="answer this one message on stdout and exit")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--greedy", action="store_true", help="always take the most likely character")
    ap.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--slide", type=int, default=None, metavar="N",
                    help="past the context, move the window by N characters (1 to the context; default: "
                         "context // 2 = 64; 1 is the original's always-the-last-128, slower)")
    return ap


def _out(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def _notice(msg):
    print(msg, file=sys.stderr, flush=True)


def _read_line(tty):
    """One line of input, or None at end of input."""
    if tty:
        return input("you> ")
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def handle_message(session, line, tty):
    message = line.strip()
    if not message:
        return
    message, bad = session.clean(message)
    if bad:
        shown = "".join(bad).encode("unicode_escape").decode("ascii")
        _notice(f"chat: dropped {len(bad)} character(s) not in the vocabulary: {shown}")
    if not message.strip():
        _notice("chat: nothing left to send")
        return
    if len(message) > session.context:
        _notice(f"chat: message longer than the {session.context}-character window; only its end is seen")
    if tty:
        _out("bot> ")
    try:
        session.reply(message, emit=_out)
    except KeyboardInterrupt:
        _out("\n")
        _notice("chat: reply interrupted")
        return
    _out("\n")


def repl(session):
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        _notice("TinyLLM (NumPy). Type a message; /help for commands, /quit or Ctrl-D to leave.")
    while True:
        try:
            line = _read_line(tty)
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None:
            if tty:
                _out("\n")
            return 0
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/reset":
            session.reset()
            _notice("chat: conversation cleared")
        elif cmd == "/help":
            _notice(HELP)
        elif cmd.startswith("/") and " " not in cmd and len(cmd) > 1:
            _notice(f"chat: unknown command {cmd}; /help lists them")
        else:
            try:
                handle_message(session, line, tty)
            except KeyboardInterrupt:
                return 0


def main(argv=None):
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while loading the weights or setting up: leave quietly
        return 130


def _main(argv):
    args, code = build_parser().parse_or_code(argv)
    if args is None:
        return code
    try:
        sys.stdin.reconfigure(errors="replace")  # invalid UTF-8 becomes U+FFFD, then is dropped
    except (AttributeError, ValueError):
        pass
    for name, ok in (("--temperature", args.temperature >= 0), ("--max-new-tokens", args.max_new_tokens > 0),
                     ("--top-k", args.top_k is None or args.top_k > 0)):
        if not ok:
            _notice(f"chat: error: {name} must be {'>= 0' if name == '--temperature' else 'positive'}")
            return EXIT_USAGE
    path = args.weights or default_weights()
    try:
        model = load_model(path)
        session = ChatSession(model, args.temperature, args.top_k, args.greedy, args.seed, args.max_new_tokens,
                              slide=args.slide)
    except WeightsError as e:
        msg = str(e)
        _notice(f"chat: error: {msg if msg.startswith(path) else f'{path}: {msg}'}")
        return EXIT_USAGE
    except ValueError as e:  # --slide out of range for this model's context
        _notice(f"chat: error: --{e}")
        return EXIT_USAGE
    try:
        if args.prompt is not None:
            handle_message(session, args.prompt, tty=False)
            return 0
        return repl(session)
    except KeyboardInterrupt:
        _out("\n")
        return 130
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        return stdout_gone()


if __name__ == "__main__":
    sys.exit(main())

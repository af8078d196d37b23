"""Deterministic dialogue generator (the original's save_dataset.py).

    python -m tinyllm_np.dataset                 # writes data/dialogue.txt
    python -m tinyllm_np.dataset --out FILE --seed 0

Each line of the output is one exchange in the original format::

    <|user|>What is AI?<|bot|>AI stands for Artificial Intelligence. ...<|end|>

Every intent below is asked in many phrasings (a few misspelled on purpose,
as people type); each phrasing also appears in lower case and without its final
punctuation, so the model learns to map questions it has not seen word for word onto the right answer.
The answer to an intent is always the same text, which is what lets a
626,560-parameter model answer reliably.  The output uses exactly the 59
characters in ``ALPHABET`` and is the same bytes on every run (seeded
``random.Random``; no hashing, no clock).
"""

import os
import random
import sys

from .cli import OneLineParser
from .fileio import atomic_write_bytes
from .tokenizer import BOT, END, USER

ALPHABET = (
    "\n !',.<>?|"
    "ABCDEFGHIJKLMNOPRSTUVWY"  # every capital but Q, X and Z
    "abcdefghijklmnopqrstuvwxyz"
)  # 10 + 23 + 26 = 59 characters, the original's vocabulary size; numbers are spelled out

# (weight, phrasings, answer).  The first three carry the original's examples.
INTENTS = [
    (6, ["Hello!", "Hello", "Hi!", "Hi", "Hey!", "Hey", "Hi there!", "Hello there!", "Hey there!",
         "Good morning!", "Good afternoon!", "Good evening!", "Greetings!", "Howdy!", "Yo!", "Hiya!",
         "Hello bot!", "Hi bot!", "Hey bot", "helo", "helloo", "hii", "heyy", "hi there", "Hello, bot!"],
     "Hi there! How can I help you today?"),
    (5, ["What is AI?", "What's AI?", "What does AI mean?", "What is artificial intelligence?",
         "Can you explain AI?", "Explain AI to me.", "Tell me about AI.", "What does AI stand for?",
         "Define AI.", "What is AI exactly?", "What is an AI?", "wat is ai", "what is ai",
         "whats ai", "Explain artificial intelligence.", "What is artifical intelligence?"],
     "AI stands for Artificial Intelligence. It refers to computer systems designed to perform tasks "
     "that typically require human intelligence."),
    (5, ["Tell me a joke", "Tell me a joke!", "Tell me a joke.", "Tell me something funny.",
         "Do you know any jokes?", "Can you tell me a joke?", "Say something funny!", "Make me laugh!",
         "I want to hear a joke.", "Got any jokes?", "Know any good jokes?", "tell me a jok",
         "tel me a joke", "joke please", "A joke, please!", "Tell me a computer joke."],
     "Why did the computer go to the doctor? Because it had a virus!"),
    (4, ["How are you?", "How are you doing?", "How's it going?", "How are you today?",
         "How do you feel?", "Are you doing well?", "How have you been?", "hows it going",
         "how r u", "how are u", "How are things?", "You doing okay?", "How is your day?"],
     "I am doing great, thank you for asking! How can I help you?"),
    (4, ["Who are you?", "What are you?", "What is your name?", "What's your name?",
         "Tell me about yourself.", "Introduce yourself.", "Are you a robot?", "Are you a bot?",
         "Are you human?", "who r u", "whats your name", "Do you have a name?", "What should I call you?"],
     "I am TinyLLM, a small chat bot made of a tiny transformer trained on dialogue text."),
    (4, ["What can you do?", "What do you do?", "How can you help me?", "What are you good at?",
         "What can you help with?", "What are your skills?", "What is your purpose?",
         "what can u do", "wat can you do", "What are you for?"],
     "I can chat with you, answer simple questions and tell you a joke."),
    (4, ["Thank you!", "Thanks!", "Thank you so much!", "Thanks a lot!", "Thanks for your help!",
         "Thank you very much.", "Much appreciated!", "thx", "thanks", "ty", "Thanks, bot!",
         "I appreciate it.", "Cheers!"],
     "You are welcome! I am happy to help."),
    (4, ["Goodbye!", "Bye!", "Bye", "See you later!", "See you!", "Good night!", "I have to go.",
         "Talk to you later!", "Bye bye!", "Take care!", "cya", "bye now", "gotta go", "Later!"],
     "Goodbye! Have a great day!"),
    (3, ["What is machine learning?", "What's machine learning?", "Explain machine learning.",
         "What is ML?", "Define machine learning.", "Tell me about machine learning.",
         "How does machine learning work?", "what is machine lerning", "what is ml"],
     "Machine learning is a part of AI where computers learn patterns from data instead of "
     "following fixed rules."),
    (3, ["What is deep learning?", "Explain deep learning.", "What's deep learning?",
         "Define deep learning.", "what is deep lerning", "Tell me about deep learning."],
     "Deep learning uses neural networks with many layers to learn from large amounts of data."),
    (3, ["What is a neural network?", "What are neural networks?", "Explain neural networks.",
         "How does a neural network work?", "what is a neural net", "Define a neural network."],
     "A neural network is a model made of layers of simple units that learn by adjusting their "
     "weights."),
    (3, ["What is a transformer?", "How do transformers work?", "Explain transformers.",
         "What is a transformer model?", "What is attention?", "what is a transfomer"],
     "A transformer is a neural network that uses attention to decide which earlier words matter "
     "for the next one."),
    (3, ["What is a language model?", "What is an LLM?", "What is a large language model?",
         "Explain language models.", "what is an llm", "How do language models work?"],
     "A language model predicts the next word or character from the text that came before it."),
    (3, ["How do you work?", "How were you made?", "How were you trained?", "How do you think?",
         "What are you made of?", "how do u work", "How do you answer me?"],
     "I read your message one character at a time and predict the most likely next character, "
     "over and over."),
    (3, ["What is a computer?", "Explain computers.", "What does a computer do?", "Define a computer.",
         "what is a computr", "How does a computer work?"],
     "A computer is a machine that follows instructions to store and process information."),
    (3, ["What is programming?", "What is coding?", "What is a program?", "Explain programming.",
         "What does a programmer do?", "what is progamming", "How do I start coding?"],
     "Programming is writing instructions that tell a computer what to do."),
    (3, ["What is Python?", "Tell me about Python.", "What is the Python language?",
         "Is Python good for beginners?", "what is python", "Why is Python popular?"],
     "Python is a popular programming language known for simple and readable code."),
    (2, ["What is an algorithm?", "Explain algorithms.", "Define algorithm.", "what is an algoritm",
         "What does algorithm mean?"],
     "An algorithm is a list of steps that solves a problem."),
    (2, ["What is data?", "What does data mean?", "Explain data.", "Define data."],
     "Data is information, like numbers, words or pictures, that a computer can store and use."),
    (2, ["What is the internet?", "How does the internet work?", "Explain the internet.",
         "what is the internet", "What is the web?"],
     "The internet is a huge network that connects computers all around the world."),
    (2, ["What is a CPU?", "What does a CPU do?", "What is a processor?", "what is a cpu"],
     "A CPU is the part of a computer that carries out instructions."),
    (2, ["What is a GPU?", "What does a GPU do?", "What is a graphics card?", "what is a gpu"],
     "A GPU is a processor built to do many simple calculations at once, which is great for AI."),
    (2, ["What is memory?", "What is RAM?", "What does RAM do?", "what is ram"],
     "Memory, or RAM, is where a computer keeps the data it is working on right now."),
    (2, ["What is a robot?", "Explain robots.", "What do robots do?", "what is a robot"],
     "A robot is a machine that can sense the world and act on its own."),
    (2, ["What is science?", "Explain science.", "What do scientists do?", "what is science"],
     "Science is a way of learning about the world by asking questions and testing ideas."),
    (2, ["What is physics?", "Explain physics.", "What do physicists study?", "what is physics"],
     "Physics is the science of matter, energy, motion and forces."),
    (2, ["What is chemistry?", "Explain chemistry.", "what is chemistry"],
     "Chemistry is the science of what things are made of and how substances change."),
    (2, ["What is biology?", "Explain biology.", "what is biology"],
     "Biology is the science of living things, from tiny cells to whole animals and plants."),
    (2, ["What is math?", "What is mathematics?", "Why is math important?", "what is math"],
     "Math is the study of numbers, shapes and patterns."),
    (2, ["What is gravity?", "Explain gravity.", "Why do things fall?", "what is gravity"],
     "Gravity is the force that pulls things toward each other, like an apple toward the ground."),
    (2, ["What is the sun?", "What is the Sun?", "Is the sun a star?", "what is the sun"],
     "The Sun is a star at the center of our solar system."),
    (2, ["What is the moon?", "What is the Moon?", "Why does the moon shine?", "what is the moon"],
     "The Moon goes around the Earth and shines because it reflects light from the Sun."),
    (2, ["How many planets are there?", "How many planets are in the solar system?",
         "how many planets are there"],
     "There are eight planets in our solar system."),
    (2, ["What is water made of?", "What is water?", "What is water made from?", "what is water made of"],
     "Water is made of hydrogen and oxygen."),
    (2, ["Why is the sky blue?", "Why is the sky blue", "why is the sky blue", "What makes the sky blue?"],
     "The sky looks blue because air scatters blue sunlight more than other colors."),
    (2, ["What is the boiling point of water?", "At what temperature does water boil?",
         "When does water boil?", "what temperature does water boil"],
     "Water boils at one hundred degrees Celsius at sea level."),
    (2, ["How many days are in a week?", "How many days in a week?", "how many days are in a week"],
     "There are seven days in a week."),
    (2, ["How many days are in a year?", "How many days in a year?", "how many days in a year"],
     "There are three hundred sixty five days in a year, or three hundred sixty six in a leap year."),
    (2, ["How many hours are in a day?", "How many hours in a day?", "how many hours in a day"],
     "There are twenty four hours in a day."),
    (2, ["How many minutes are in an hour?", "How many minutes in an hour?",
         "how many minutes in an hour"],
     "There are sixty minutes in an hour."),
    (2, ["What is two plus two?", "What's two plus two?", "what is two plus two",
         "How much is two plus two?", "What does two plus two make?"],
     "Two plus two is four."),
    (2, ["What is ten times ten?", "What's ten times ten?", "what is ten times ten"],
     "Ten times ten is one hundred."),
    (2, ["How many continents are there?", "How many continents are on Earth?",
         "how many continents are there"],
     "There are seven continents on Earth."),
    (2, ["What is the biggest ocean?", "What is the largest ocean?", "Which ocean is the biggest?",
         "whats the biggest ocean"],
     "The Pacific is the biggest ocean on Earth."),
    (2, ["What is the tallest mountain?", "What is the highest mountain?",
         "Which mountain is the tallest?", "whats the tallest mountain"],
     "Mount Everest is the tallest mountain on Earth."),
    (2, ["What is the capital of Spain?", "What's the capital of Spain?", "capital of spain?"],
     "The capital of Spain is Madrid."),
    (2, ["What is the capital of Italy?", "What's the capital of Italy?", "capital of italy?"],
     "The capital of Italy is Rome."),
    (2, ["What is the capital of Germany?", "What's the capital of Germany?", "capital of germany?"],
     "The capital of Germany is Berlin."),
    (2, ["What is the capital of France?", "What's the capital of France?", "capital of france?"],
     "The capital of France is Paris."),
    (2, ["What is the hottest planet?", "Which planet is the hottest?", "whats the hottest planet"],
     "Venus is the hottest planet in our solar system."),
    (2, ["What is the capital of Japan?", "What's the capital of Japan?", "capital of japan?"],
     "The capital of Japan is Tokyo."),
    (3, ["Can you help me?", "I need help.", "Help!", "Help me please.", "Can you assist me?",
         "I have a question.", "Can I ask you something?", "help", "i need help", "Please help."],
     "Of course! Tell me what you need and I will do my best."),
    (2, ["I am sad.", "I feel sad.", "I am feeling down.", "I had a bad day.", "i am sad",
         "I feel lonely."],
     "I am sorry you feel that way. Talking about it can help, and I am here to listen."),
    (2, ["I am happy!", "I feel great!", "I had a good day!", "i am happy", "I am so happy today!"],
     "That is wonderful to hear! I am happy for you."),
    (2, ["I am bored.", "I'm bored.", "What should I do?", "i am bored", "Give me an idea."],
     "You could read a book, go for a walk, or learn something new, like how AI works!"),
    (2, ["Do you like me?", "Are you my friend?", "Will you be my friend?", "are you my friend"],
     "Of course! I am always happy to chat with you."),
    (2, ["Are you smart?", "Are you intelligent?", "How smart are you?", "are you smart"],
     "I am a very small model, so I know a few things well, but not much more."),
    (2, ["Do you have feelings?", "Can you feel?", "Are you alive?", "Are you conscious?",
         "do you have feelings"],
     "No, I am a computer program. I do not have feelings, but I like to chat."),
    (2, ["What time is it?", "What day is it?", "What is the date today?", "what time is it"],
     "I do not have a clock, so I cannot tell the time. Please check your device."),
    (2, ["What is the weather like?", "Is it going to rain?", "How is the weather?",
         "whats the weather"],
     "I cannot see the weather, but a weather app can tell you."),
    (2, ["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "who made you"],
     "I was built by people who wanted to show how a tiny transformer works, using only NumPy."),
    (2, ["What is NumPy?", "Tell me about NumPy.", "what is numpy"],
     "NumPy is a Python library for fast math on arrays of numbers."),
    (2, ["What is your favorite color?", "Do you have a favorite color?", "whats your favorite color"],
     "I like blue, the color of the sky."),
    (2, ["What is your favorite food?", "Do you eat?", "Are you hungry?", "whats your favorite food"],
     "I do not eat, but I hear pizza is very popular."),
    (2, ["Tell me a fun fact.", "Tell me something interesting.", "Do you know a fun fact?",
         "tell me a fact", "Give me a fun fact!"],
     "Octopuses have three hearts and blue blood."),
    (2, ["Tell me another joke.", "Another joke!", "One more joke, please.", "tell me another joke"],
     "Why do programmers like dark mode? Because light attracts bugs!"),
    (2, ["Yes", "Yes!", "Yes.", "Yeah", "Sure", "Okay", "Ok", "OK", "yes", "ok", "sure"],
     "Great! What would you like to talk about?"),
    (2, ["No", "No.", "Nope", "No thanks.", "no", "nah"],
     "Alright. Let me know if you need anything."),
    (2, ["Nice!", "Cool!", "Awesome!", "Great!", "Wow!", "nice", "cool"],
     "I am glad you like it!"),
]

SOURCE_VARIANTS = 4  # each phrasing: as written, lower case, no final punctuation, both


def variants(phrase):
    """The phrasing as written, in lower case, and without its final punctuation."""
    out = [phrase, phrase.lower()]
    stripped = phrase.rstrip("!?.")
    if stripped and stripped != phrase:
        out += [stripped, stripped.lower()]
    seen, uniq = set(), []
    for v in out:
        if v not in seen:
            seen.add(v)
            uniq.append(v)
    return uniq


def exchange(question, answer):
    return f"{USER}{question}{BOT}{answer}{END}"


def generate(seed=0, n_dialogues=11_500):
    """The whole dataset as one string: n_dialogues exchanges, one per line."""
    rng = random.Random(seed)
    pool, weights, answer_of = [], [], {}
    for weight, phrasings, answer in INTENTS:
        questions = [v for p in phrasings for v in variants(p)]
        for q in questions:
            if answer_of.setdefault(q, answer) != answer:
                raise ValueError(f"question {q!r} is given two different answers")
            pool.append(exchange(q, answer))
            weights.append(weight / len(questions))  # an intent's weight is shared by its phrasings
    # Every phrasing appears at least once, the rest is drawn by weight.
    if n_dialogues < len(pool):
        raise ValueError(f"need at least {len(pool)} dialogues to include every phrasing once")
    lines = pool + rng.choices(pool, weights=weights, k=n_dialogues - len(pool))
    rng.shuffle(lines)
    text = "\n".join(lines) + "\n"
    bad = sorted(set(text) - set(ALPHABET))
    if bad:
        raise ValueError(f"dataset uses characters outside ALPHABET: {bad!r}")
    return text


def main(argv=None):
    ap = OneLineParser(prog="python -m tinyllm_np.dataset", description="Write the dialogue dataset.")
    ap.add_argument("--out", default=os.path.join("data", "dialogue.txt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dialogues", type=int, default=11_500)
    args = ap.parse_args(argv)
    try:
        text = generate(args.seed, args.dialogues)
        atomic_write_bytes(args.out, text.encode("utf-8"))
    except (ValueError, OSError) as e:
        print(f"dataset: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(text.encode('utf-8')):,} bytes, {args.dialogues:,} exchanges, "
          f"{len(set(text))} distinct characters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

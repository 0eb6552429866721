"""Every text the model reads, in one place: instructions, the student prompt, the teacher's user
message (SPEC section 1, "Privileged context") and the feedback lines.

Used by training (train_antisd.py), evaluation (evaluate.py, data/loading.py) and the tiny-model
builder (models/build_tiny_model.py). The committed tiny model was trained on these exact strings:
changing one byte changes what it sees.
"""

from __future__ import annotations

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
                        "in a markdown code block:")

# The code instruction of the paper's App. C, which follows SDPO's (lasgroup/SDPO, data/format/prompts.py
# CODE_PROMPT, the text before "{problem}"); it comes before the problem (code_user_prompt).
CODE_INSTRUCTION = ("You are a coding expert. You will be given a coding problem, and you need to write a correct "
                    "Python program that matches the specification and passes all tests. The time limit is 1 second. "
                    "You may start by outlining your thought process. In the end, please provide the complete code in "
                    "a code block enclosed with ``` ```.")

FEEDBACK_CORRECT = "Your answer is correct."
FEEDBACK_INCORRECT = "Your answer is incorrect."


def answer_feedback(correct: bool) -> str:
    """Feedback on a math answer: FEEDBACK_CORRECT or FEEDBACK_INCORRECT (the gold is never shown)."""
    return FEEDBACK_CORRECT if correct else FEEDBACK_INCORRECT


def code_feedback(passed: int, total: int) -> str:
    """Feedback on a program: how many of the test cases it passes."""
    return f"Your code passes {passed} of {total} test cases."


def user_prompt(problem: str, instruction: str) -> str:
    """The student's user turn for a math problem: the problem, then the instruction if any."""
    return f"{problem}\n{instruction}" if instruction else problem


def code_user_prompt(problem: str, instruction: str) -> str:
    """The student's user turn for a code problem (training rows): the instruction, a blank line, the
    problem, as SDPO's code prompt; the bare problem without an instruction (the embedded code task)."""
    return f"{instruction}\n\n{problem}" if instruction else problem


def code_prompt(task_prompt: str, instruction: str) -> str:
    """The user turn for an MBPP+ task as evalplus writes it: the instruction, then the task's
    prompt in a code fence (without evalplus's assistant prefill)."""
    code = f"```\n{task_prompt.strip()}\n```\n"
    return f"{instruction}\n{code}" if instruction else code


def teacher_user_message(prompt: str, solution: str | None, feedback: str) -> str:
    """The teacher's user turn (SPEC §1): prompt, then the shown solution if any, then feedback."""
    message = prompt
    if solution is not None:
        message += f"\nYour previous attempt:\n\n{solution}\n\n"
    message += f"\nPrevious assessment: {feedback}\n"
    return message + "\n\nNow solve this problem step by step.\n"

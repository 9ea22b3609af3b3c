"""`cronclock completion bash|zsh`: shell completion scripts, written from the command line's own
parser so that a new command or option completes without an edit here. Job names complete
for the commands that take one; the script asks `cronclock completion jobs` for them (the job
table of the environment the shell has)."""

from __future__ import annotations

import argparse

# Commands whose positional argument is a job name.
JOB_COMMANDS = ("next", "fire", "pause", "resume", "trigger", "backfill")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers here, and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def bash(parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    cases = []
    for name, sub in commands.items():
        options = " ".join(_options(sub))
        nested = _subcommands(sub)
        if nested:
            inner = "\n".join(
                f"                {action}) words={_quote(' '.join(_options(p)))} ;;"
                for action, p in nested.items()
            )
            first = _quote(" ".join([*nested, *_options(sub)]))
            body = (
                f"            if [[ -z $second ]]; then words={first}\n"
                f"            else case $second in\n{inner}\n            esac; fi"
            )
        elif name in JOB_COMMANDS:
            body = (
                f"            if [[ $cur == -* ]]; then words={_quote(options)}\n"
                '            else words=$("${COMP_WORDS[0]}" completion jobs 2>/dev/null); fi'
            )
        elif name == "completion":
            body = "            words='bash zsh'"
        else:
            body = f"            words={_quote(options)}"
        cases.append(f"        {name})\n{body} ;;")
    top = " ".join([*commands, *_options(parser)])
    return f"""# cronclock completion for bash: source <(cronclock completion bash)
_cronclock() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} command="" second="" words="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            -*) ;;
            *) if [[ -z $command ]]; then command=${{COMP_WORDS[i]}}
               elif [[ -z $second ]]; then second=${{COMP_WORDS[i]}}; fi ;;
        esac
    done
    case $command in
        "") words={_quote(top)} ;;
{chr(10).join(cases)}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _cronclock cronclock
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    described = " ".join(_quote(f"{name}:{text}") for name, text in _helps(parser).items())
    cases = []
    for name, sub in commands.items():
        options = " ".join(_options(sub))
        nested = _subcommands(sub)
        if nested:
            actions = " ".join(_quote(f"{a}:{t}") for a, t in _helps(sub).items())
            inner = "\n".join(
                f"        {action}) compadd -- {' '.join(_options(p))} ;;"
                for action, p in nested.items()
            )
            body = (
                f"      if (( CURRENT == 3 )); then local -a actions=({actions}); "
                f"_describe action actions; compadd -- {options}\n"
                f"      else case $words[3] in\n{inner}\n      esac; fi"
            )
        elif name in JOB_COMMANDS:
            body = (
                f"      if [[ $PREFIX == -* ]]; then compadd -- {options}\n"
                '      else compadd -- ${(f)"$($words[1] completion jobs 2>/dev/null)"}; fi'
            )
        elif name == "completion":
            body = "      compadd -- bash zsh"
        else:
            body = f"      compadd -- {options}"
        cases.append(f"    {name})\n{body} ;;")
    return f"""#compdef cronclock
# cronclock completion for zsh: cronclock completion zsh > "${{fpath[1]}}/_cronclock"
# (or, for this shell only: source <(cronclock completion zsh))
_cronclock() {{
  if (( CURRENT == 2 )); then
    local -a commands=({described})
    _describe command commands
    compadd -- {" ".join(_options(parser))}
    return
  fi
  case $words[2] in
{chr(10).join(cases)}
  esac
}}
if [[ $funcstack[1] == _cronclock ]]; then _cronclock "$@"; else compdef _cronclock cronclock; fi
"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    return bash(parser) if shell == "bash" else zsh(parser)

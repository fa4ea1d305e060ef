"""Which Python packages the worker needs, which are missing, and how to install them safely.

The worker runs with Slicer's own Python, so the packages must be in Slicer's environment.
What users of other AI extensions complained about most is decided here, without Qt, and
tested:

* torch goes through the PyTorch extension's installer when that extension is there (it
  picks the CUDA build that matches the driver); plain pip otherwise (a CPU or default-CUDA
  wheel from PyPI - the message says so);
* the rest is pip-installed with minimum versions (an old MONAI silently breaks things);
* Slicer's own packages (numpy, SimpleITK) are never installed or upgraded: if one is
  missing or too old, the message says to update Slicer; and every pip call gets a
  constraints file that pins Slicer's installed numpy/SimpleITK/VTK, so that no dependency
  replaces them;
* the user is asked once, with everything that will be installed in one message.

The widget supplies the two installers (``PyTorchUtilsLogic.installTorch``,
``slicer.util.pip_install``) as plain callables.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModuleError

# The oldest Slicer that can run the module: the first with Python 3.10 or newer (5.10 ships 3.12;
# up to 5.8 Slicer has Python 3.9, and the module and the engine use 3.10 features such as
# zip(strict=True)) and SimpleITK 2.3 or newer (5.4 and 5.6 ship 2.2).
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 10)


def slicerVersionProblem(slicerVersion: Sequence[int], pythonVersion: Sequence[int]) -> str | None:
    """Why this Slicer cannot run the module, with what to install (None: it can).

    Checked when the module loads; this file and the module file must stay importable on the
    Python of older Slicers (3.9) so that this message, not a traceback, is what users see."""
    slicerVersion, pythonVersion = tuple(slicerVersion[:2]), tuple(pythonVersion[:2])
    if slicerVersion >= MINIMUM_SLICER and pythonVersion >= MINIMUM_PYTHON:
        return None
    needed = ".".join(str(v) for v in MINIMUM_SLICER)
    return (
        f"BidirUncertaintySeg needs 3D Slicer {needed} or newer; this is Slicer "
        f"{'.'.join(str(v) for v in slicerVersion)} with Python {'.'.join(str(v) for v in pythonVersion)}. "
        f"The module and its engine need Python {'.'.join(str(v) for v in MINIMUM_PYTHON)} or newer and "
        f"SimpleITK 2.3 or newer, which Slicer ships from version {needed}. Install the current "
        "Slicer release from https://download.slicer.org and the extension again in it."
    )


PYTORCH = "pytorch"  # installed by the PyTorch extension (light-the-torch), else pip
PIP = "pip"
SLICER = "slicer"  # part of Slicer: never installed or upgraded by this module


@dataclass(frozen=True)
class Requirement:
    distribution: str  # the name pip knows
    importName: str  # the module the engine imports
    minimum: str
    below: str | None = None  # first version that is too new (exclusive), if any
    installer: str = PIP
    why: str = ""

    @property
    def specifier(self) -> str:
        return f">={self.minimum}" + (f",<{self.below}" if self.below else "")

    @property
    def pipRequirement(self) -> str:
        return f"{self.distribution}{self.specifier}"


# What `python -m buseg train|predict|rank` imports (the versions of pyproject.toml).
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "torch", "2.2", "3", PYTORCH, "the neural networks"),
    Requirement("monai", "monai", "1.4", "2", PIP, "sliding-window inference and metrics"),
    Requirement("scipy", "scipy", "1.10", None, PIP, "connected regions and image filters"),
    Requirement("slicerio", "slicerio", "1.1", None, PIP, "reading and writing .seg.nrrd segmentations"),
    Requirement("psutil", "psutil", "5.9", None, PIP, "memory checks and stopping the worker cleanly"),
    Requirement("numpy", "numpy", "1.24", None, SLICER, "arrays"),
    Requirement("SimpleITK", "SimpleITK", "2.3", None, SLICER, "reading and writing images"),
)
# Slicer's packages pinned during every pip install (those that pip can see).
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk")


def installedVersion(distribution: str) -> str | None:
    """The installed version of a distribution in this Python, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versionKey(version: str) -> tuple[int, ...]:
    """'2.13.0+cu121' -> (2, 13, 0); '1.4rc1' -> (1, 4). Enough for minimum/maximum checks."""
    numbers = []
    for part in str(version).split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def satisfies(version: str, requirement: Requirement) -> bool:
    key = versionKey(version)
    if key < versionKey(requirement.minimum):
        return False
    return not (requirement.below and key >= versionKey(requirement.below))


@dataclass(frozen=True)
class Problem:
    requirement: Requirement
    installed: str | None

    @property
    def text(self) -> str:
        r = self.requirement
        if self.installed is None:
            return f"{r.distribution} is not installed (needed for {r.why})"
        return f"{r.distribution} {self.installed} does not satisfy {r.specifier} (needed for {r.why})"


def findProblems(
    requirements: Sequence[Requirement] = REQUIREMENTS,
    versionOf: Callable[[str], str | None] = installedVersion,
) -> list[Problem]:
    """The requirements that are missing or of an unsuitable version."""
    problems = []
    for requirement in requirements:
        version = versionOf(requirement.distribution)
        if version is None or not satisfies(version, requirement):
            problems.append(Problem(requirement, version))
    return problems


@dataclass(frozen=True)
class InstallStep:
    installer: str  # PYTORCH or PIP
    requirement: str  # 'torch>=2.2,<3', 'monai>=1.4,<2'
    distribution: str


@dataclass
class InstallPlan:
    steps: list[InstallStep] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # what cannot be installed here (Slicer's own packages)
    notes: list[str] = field(default_factory=list)
    restartNeeded: bool = False
    constraints: dict[str, str] = field(default_factory=dict)  # distribution -> pinned installed version

    @property
    def nothingToDo(self) -> bool:
        return not self.steps and not self.blockers

    def summary(self) -> str:
        """What will be installed, in one line per package."""
        lines = []
        for step in self.steps:
            how = (
                "with the PyTorch extension (matching your GPU driver)"
                if step.installer == PYTORCH
                else "with pip"
            )
            lines.append(f"- {step.requirement} {how}")
        return "\n".join(lines)

    def confirmationText(self) -> str:
        """The one question the user is asked before anything is installed."""
        text = (
            "BidirUncertaintySeg needs these Python packages in Slicer's Python environment:\n\n"
            f"{self.summary()}\n\nThis downloads up to a few GB and can take several minutes. "
            "Slicer's own packages (numpy, SimpleITK, VTK) are kept as they are."
        )
        if self.notes:
            text += "\n\n" + "\n".join(self.notes)
        if self.restartNeeded:
            text += "\n\nSlicer must be restarted afterwards (a package in use is upgraded)."
        return text + "\n\nInstall now?"

    def pipArguments(self, step: InstallStep, constraintsPath: str | Path | None) -> list[str]:
        """The ``pip install`` arguments of a step (a list: ``slicer.util.pip_install`` accepts one)."""
        args = [step.requirement]
        if constraintsPath is not None and self.constraints:
            args += ["--constraint", str(constraintsPath)]
        return args

    def constraintsText(self) -> str:
        return "".join(f"{name}=={version}\n" for name, version in sorted(self.constraints.items()))


def planInstall(
    problems: Sequence[Problem],
    *,
    pytorchExtensionAvailable: bool,
    versionOf: Callable[[str], str | None] = installedVersion,
    loadedModules: Sequence[str] | None = None,
) -> InstallPlan:
    """Decide how each problem is solved (or that it cannot be, here)."""
    loaded = set(sys.modules if loadedModules is None else loadedModules)
    plan = InstallPlan()
    for name in PROTECTED_DISTRIBUTIONS:
        version = versionOf(name)
        if version is not None:
            plan.constraints[name] = version
    for problem in problems:
        r = problem.requirement
        if r.installer == SLICER:
            plan.blockers.append(
                f"{problem.text}. It is part of Slicer and is not replaced by extensions: "
                "use a current Slicer release."
            )
            continue
        if r.installer == PYTORCH and pytorchExtensionAvailable:
            plan.steps.append(InstallStep(PYTORCH, r.pipRequirement, r.distribution))
        else:
            if r.installer == PYTORCH:
                plan.notes.append(
                    "The PyTorch extension is not installed: torch comes from PyPI with pip, "
                    "which may not match your GPU. Installing the PyTorch extension from the "
                    "Extensions Manager first is recommended."
                )
            plan.steps.append(InstallStep(PIP, r.pipRequirement, r.distribution))
        if problem.installed is not None and r.importName in loaded:
            plan.restartNeeded = True
    # torch first: MONAI's pip install would otherwise pull a default torch build.
    plan.steps.sort(key=lambda s: s.installer != PYTORCH and s.distribution != "torch")
    return plan


READY, BLOCKED, DECLINED, ASK = "ready", "blocked", "declined", "ask"


def nextStep(plan: InstallPlan, *, declinedBefore: bool, explicit: bool) -> str:
    """What to do before a job (or when the user presses 'Install Python packages'):

    * ``ready`` - nothing missing;
    * ``blocked`` - something only a Slicer update can fix (show the blockers);
    * ``declined`` - the user said no before in this session: do not ask again on every click
      (show what is missing; the explicit install button asks again);
    * ``ask`` - show :meth:`InstallPlan.confirmationText` once, install if accepted.
    """
    if plan.nothingToDo:
        return READY
    if plan.blockers:
        return BLOCKED
    if declinedBefore and not explicit:
        return DECLINED
    return ASK


def runPlan(
    plan: InstallPlan,
    *,
    installTorch: Callable[[str], object],
    pipInstall: Callable[[list[str]], object],
    constraintsFolder: str | Path,
    log: Callable[[str], None] = print,
) -> None:
    """Carry out ``plan``. ``installTorch(versionSpecifier)`` must return something true on success
    (PyTorchUtils returns the torch module, or None when declined/failed); ``pipInstall(args)``
    raises on failure. Raises :class:`ModuleError` naming the step that failed."""
    if plan.blockers:
        raise ModuleError("\n".join(plan.blockers))
    constraintsPath = None
    if plan.constraints:
        constraintsPath = Path(constraintsFolder) / "bidiruncertaintyseg-constraints.txt"
        constraintsPath.parent.mkdir(parents=True, exist_ok=True)
        constraintsPath.write_text(plan.constraintsText())
    for step in plan.steps:
        log(f"Installing {step.requirement}...")
        try:
            if step.installer == PYTORCH:
                specifier = step.requirement[len(step.distribution) :]
                if not installTorch(specifier):
                    raise ModuleError("the PyTorch extension did not install torch (declined or failed)")
            else:
                pipInstall(plan.pipArguments(step, constraintsPath))
        except ModuleError as exc:
            raise ModuleError(f"Installing {step.requirement} failed: {exc}") from None
        except Exception as exc:  # pip's CalledProcessError, network errors ...: report which step
            raise ModuleError(f"Installing {step.requirement} failed: {exc}") from exc
    log("Python packages installed.")

import os

# Loading a key directory turns core dumps off for the whole process
# (curvetun.vault.disable_core_dumps), and a hard limit of 0 cannot be
# raised again without CAP_SYS_RESOURCE: keep the test processes debuggable,
# and able to start children that may dump core (tests/test_vault.py's
# CoreDumpTests remove this setting for the children they test).
os.environ.setdefault("CURVETUN_ALLOW_CORE_DUMPS", "1")

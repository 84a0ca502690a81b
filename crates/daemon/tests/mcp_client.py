"""Drives `wick mcp` with the official MCP Python SDK (PyPI `mcp`), as a coding agent would.

argv: WORK_DIR REPO_DIR COMMAND... (the command that starts `wick mcp`). Guest paths live under
WORK_DIR: the test's "guest" is the fake Firecracker's agent on this host. Prints one line per
step and exits non-zero on the first failed check.
"""

import asyncio
import os
import sys

from jsonschema import Draft202012Validator
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError

TOOLS = {
    "create_vm", "list_vms", "show_vm", "exec", "run_repository", "read_file", "write_file",
    "list_files", "ports", "export_workspace", "stop_vm", "pause_vm", "resume_vm", "delete_vm",
    "suspend_vm",
}


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


async def call(session, tool, **args):
    result = await session.call_tool(tool, args)
    if result.isError:
        raise SystemExit(f"FAILED: {tool} {args}: {result.content}")
    return result.structuredContent


async def main(work, repo, command):
    params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            check(init.serverInfo.name == "wick", f"server is wick ({init.serverInfo})")

            tools = (await session.list_tools()).tools
            names = {t.name for t in tools}
            check(TOOLS <= names, f"tools listed: {sorted(names)}")
            for t in tools:
                Draft202012Validator.check_schema(t.inputSchema)
                check(t.inputSchema.get("type") == "object", f"{t.name}: input schema is an object")
                if t.outputSchema is not None:
                    Draft202012Validator.check_schema(t.outputSchema)
                check(bool(t.description), f"{t.name}: described")

            vm = await call(session, "create_vm", name="m1")
            check(vm["name"] == "m1" and vm["state"] == "running", f"create_vm: {vm}")
            listed = await call(session, "list_vms")
            check([v["name"] for v in listed["vms"]] == ["m1"], f"list_vms: {listed}")

            r = await call(session, "exec", vm="m1",
                           command=["sh", "-c", "echo out; echo err >&2; exit 3"])
            check((r["exit_code"], r["stdout"], r["stderr"]) == (3, "out\n", "err\n"),
                  f"exec passes exit code and output: {r}")
            r = await call(session, "exec", vm="m1", command=["sh", "-c", "yes | head -c 100000"],
                           max_output_bytes=1000)
            check(len(r["stdout"]) == 1000 and r["stdout_truncated"], "exec caps output")
            r = await call(session, "exec", vm="m1", command=["sleep", "30"], timeout_secs=1)
            check(r["timed_out"] and r["exit_code"] == 137, f"exec times out: {r}")

            s = await call(session, "suspend_vm", vm="m1")
            check(s["state"] == "suspended", f"suspend_vm: {s}")
            r = await call(session, "exec", vm="m1", command=["echo", "resumed"])
            check((r["exit_code"], r["stdout"]) == (0, "resumed\n"), f"exec resumes it: {r}")
            s = await call(session, "show_vm", vm="m1")
            check(s["state"] == "running", f"running again: {s}")

            path = f"{work}/files/dir/hello.txt"
            w = await call(session, "write_file", vm="m1", path=path, content="hello\n", mode="0600")
            check(w["bytes"] == 6, f"write_file: {w}")
            f = await call(session, "read_file", vm="m1", path=path)
            check((f["content"], f["encoding"]) == ("hello\n", "utf-8"), f"read_file: {f}")
            await call(session, "write_file", vm="m1", path=f"{work}/files/dir/bin",
                       content="AAEC/w==", encoding="base64")
            f = await call(session, "read_file", vm="m1", path=f"{work}/files/dir/bin")
            check((f["content"], f["encoding"]) == ("AAEC/w==", "base64"), f"binary file: {f}")
            ls = await call(session, "list_files", vm="m1", path=f"{work}/files")
            check(ls["entries"] == [{"name": "dir", "dir": True}], f"list_files: {ls}")

            guest_repo = f"{work}/guest/repo"
            run = await call(session, "run_repository", path=repo, name="m2", guest_path=guest_repo,
                             command=["sh", "-c", "echo changed >> README.md && cat README.md"])
            check(run["exit_code"] == 0 and "changed" in run["stdout"], f"run_repository: {run}")
            patch = await call(session, "export_workspace", vm="m2", guest_path=guest_repo)
            check("+changed" in patch["patch"], f"export_workspace: {patch}")

            try:
                await session.call_tool("exec", {"vm": "no-such-vm", "command": ["true"]})
                check(False, "exec on a missing VM fails")
            except McpError as e:
                check("no-such-vm" in e.error.message, f"missing VM is an MCP error: {e.error.message}")
            try:
                await session.call_tool("create_vm", {"name": "Bad_Name"})
                check(False, "a bad name fails")
            except McpError as e:
                check(e.error.code == -32602, f"bad name is invalid_params: {e.error.message}")

            for name in ("m1", "m2"):
                d = await call(session, "delete_vm", vm=name)
                check(d["state"] == "deleted", f"delete_vm {name}")
            listed = await call(session, "list_vms")
            check(listed["vms"] == [], "no VM left")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))

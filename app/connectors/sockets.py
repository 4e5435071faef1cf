"""The TCP socket under an SSH connection, tuned for many short commands (no Nagle, quick
ACKs).
"""

from __future__ import annotations

import contextlib
import socket

_TCP_QUICKACK: int = getattr(socket, "TCP_QUICKACK", 0)


class QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (Linux TCP_QUICKACK)."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read, then re-arm quick ACKs: the kernel falls back to delayed ACKs by itself."""
        data = super().recv(bufsize, flags)
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return data


def tune_socket(sock: socket.socket) -> socket.socket:
    """Remove two ~40 ms stalls per connection, measured on loopback against OpenSSH 9.2.

    sshd sends small packets with Nagle on (it sets TCP_NODELAY only for pty sessions). After
    authentication it sends a hostkeys-00@openssh.com notice; its reply to our channel open then
    waits for our ACK of that notice, which a delayed ACK holds back ~40 ms: the first command on
    a fresh connection took 47 ms instead of 6. Quick ACKs on our side release it. And with Nagle
    on our side, our own back-to-back small writes (channel open, exec, stdin) wait for the
    server's delayed ACK: every command took ~47 ms instead of ~4 ms; TCP_NODELAY fixes that.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not _TCP_QUICKACK or sock.type != socket.SOCK_STREAM:
        return sock
    return QuickAckSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())

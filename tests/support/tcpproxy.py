"""A loopback TCP proxy in front of the real broker, so a test can take "the network" away.

``down()`` drops every connection and refuses new ones (a broker that is not there);
``freeze()`` keeps every socket open but moves no byte (a frozen broker or a silent network
partition); ``up()`` / ``thaw()`` undo them. The broker behind it is the real one, untouched, so
other tests on the same broker are not disturbed.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class TcpProxy:
    def __init__(
        self, target_port: int, host: str = "127.0.0.1", listen_host: str | None = None
    ) -> None:
        """Forward ``listen_host`` (default: ``host``):<a free port> to ``host``:``target_port``
        (a listen address of a network namespace's veth lets a process there reach a broker
        that listens on loopback only)."""
        self.target = (host, target_port)
        self.host = listen_host or host
        probe = socket.socket()
        probe.bind((self.host, 0))
        self.port: int = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._frozen = False
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="tcpproxy", daemon=True)
        self.up()
        self._thread.start()

    def url(self, vhost_path: str) -> str:
        """An AMQP URL through the proxy for a vhost path (already URL-quoted)."""
        return f"amqp://guest:guest@{self.host}:{self.port}/{vhost_path}"

    # -- control ----------------------------------------------------------------------------------
    def up(self) -> None:
        with self._lock:
            if self._listener is None:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((self.host, self.port))
                s.listen(64)
                s.setblocking(False)
                self._listener = s
        self._wake()

    def down(self) -> None:
        """Close the listener (new connections are refused) and every open connection."""
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            pairs, self._pairs = self._pairs, {}
        for s in pairs:
            with contextlib.suppress(OSError):
                s.close()
        self._wake()

    def freeze(self) -> None:
        self._frozen = True
        self._wake()

    def thaw(self) -> None:
        self._frozen = False
        self._wake()

    def close(self) -> None:
        self._stop = True
        self.down()
        self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        while not self._stop:
            sel = selectors.DefaultSelector()
            sel.register(self._wake_r, selectors.EVENT_READ)
            with self._lock:
                listener = self._listener
                socks = list(self._pairs)
            if listener is not None:
                sel.register(listener, selectors.EVENT_READ)
            if not self._frozen:
                for s in socks:
                    with contextlib.suppress(ValueError, OSError):
                        sel.register(s, selectors.EVENT_READ)
            try:
                events = sel.select(timeout=0.5)
            except OSError:
                events = []
            for key, _ in events:
                s = key.fileobj
                if s is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif s is listener:
                    self._accept(listener)
                else:
                    self._forward(s)  # type: ignore[arg-type]
            sel.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client
        self.accepted += 1

    def _forward(self, s: socket.socket) -> None:
        with self._lock:
            peer = self._pairs.get(s)
        if peer is None:
            return
        try:
            data = s.recv(65536)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        with self._lock:
            self._pairs.pop(s, None)
            self._pairs.pop(peer, None)
        for x in (s, peer):
            with contextlib.suppress(OSError):
                x.close()

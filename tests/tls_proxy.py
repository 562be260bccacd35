"""A TLS-terminating TCP proxy for tests: clients speak TLS to it, it speaks plain TCP to the
target (an amqps:// listener in front of the machine's RabbitMQ, say). Runs in a thread."""
from __future__ import annotations

import asyncio
import ssl
import threading


class TLSProxy:
    """Listens on 127.0.0.1:``port`` with ``certfile``/``keyfile``; forwards to ``target``."""

    def __init__(self, certfile: str, keyfile: str, target: tuple[str, int]) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(certfile, keyfile)
        self.target = target
        self.port = 0
        self.connections = 0  # TLS sessions completed, for tests to see it was used
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tls-proxy")

    def start(self) -> TLSProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the TLS proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass

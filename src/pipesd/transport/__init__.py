"""The wire between edge and cloud: messages, binary codec, connections, link emulation.

Layouts, validation rules, the link model and the presets: ``docs/wire.md``.
"""
from pipesd.transport import codec, conn, link, messages, netns
from pipesd.transport.codec import (FrameReader, ProtocolError, check_token_ids, decode, decode_frame, decode_payload,
                                    encode)
from pipesd.transport.conn import (ConnectionClosed, EdgeConnection, HandshakeError, read_message, serve_handshake,
                                   write_message)
from pipesd.transport.link import (BandwidthTrace, LinkEmulator, LinkProfile, bundled_trace, link_preset,
                                   preset_names)
from pipesd.transport.netns import NetnsLink, NetnsUnavailable

__all__ = ["codec", "conn", "link", "messages", "netns", "NetnsLink", "NetnsUnavailable",
           "FrameReader", "ProtocolError", "check_token_ids", "decode", "decode_frame", "decode_payload", "encode",
           "ConnectionClosed", "EdgeConnection", "HandshakeError", "read_message", "serve_handshake",
           "write_message",
           "BandwidthTrace", "LinkEmulator", "LinkProfile", "bundled_trace", "link_preset", "preset_names"]

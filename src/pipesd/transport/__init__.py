"""The wire between edge and cloud: messages, binary codec, connections, link emulation."""
from pipesd.transport import codec, conn, link, messages
from pipesd.transport.codec import FrameReader, ProtocolError, decode_frame, encode, encoded_size
from pipesd.transport.conn import ConnectionClosed, EdgeConnection
from pipesd.transport.link import BandwidthTrace, LinkEmulator, LinkProfile, link_preset

__all__ = ["codec", "conn", "link", "messages", "FrameReader", "ProtocolError", "decode_frame", "encode",
           "encoded_size", "ConnectionClosed", "EdgeConnection", "BandwidthTrace", "LinkEmulator", "LinkProfile",
           "link_preset"]

"""Control API: MessagePack-RPC over a Unix socket, and the velodctl client."""

"""tmemctl, the administrator's tool: a client of tmemd's admin socket (client) and the command
line around it (cli, with the tables in render)."""

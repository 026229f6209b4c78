"""tmemctl, the administrator's tool: a client of tmemd's admin socket (client), the command
line around it (cli), the tables it prints (render) and its refreshing view (top)."""

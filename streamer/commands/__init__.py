"""The commands above the runtime: `streamer demo`, `validate`, `view` and `watch` (cli.py parses, then calls
them). Nothing of the running worker imports them: `streamer run` never pulls in pandas, the offline readers
or the web view."""

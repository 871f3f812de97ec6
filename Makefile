# Aliases for ./dev (which needs only bash and python3 on a fresh machine).
.PHONY: run test lint broker-start broker-stop bench
run:
	./dev run
test:
	./dev test
lint:
	./dev lint
broker-start:
	./dev broker start
broker-stop:
	./dev broker stop
bench:
	./dev bench

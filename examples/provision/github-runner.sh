#!/bin/sh
# Written by ciscale: installs the GitHub Actions runner 2.329.0 and ciscale's wrapper.
set -eu
if ! command -v curl >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl ca-certificates
fi
id runner >/dev/null 2>&1 || useradd --create-home --shell /bin/sh runner
archive="$(mktemp)"
curl -fsSL --retry 5 -o "$archive" 'https://github.com/actions/runner/releases/download/v2.329.0/actions-runner-linux-x64-2.329.0.tar.gz'
echo '194f1e1e4bd02f80b7e9633fc546084d8d4e19f3928a324d512ea53430102e1d  '"$archive" | sha256sum -c -
mkdir -p /opt/actions-runner
tar -xzf "$archive" -C /opt/actions-runner
rm -f "$archive"
/opt/actions-runner/bin/installdependencies.sh
chown -R runner:runner /opt/actions-runner
mkdir -p "$(dirname /usr/local/bin/ciscale-agent)"
cat > /usr/local/bin/ciscale-agent <<'CISCALE_WRAPPER'
#!/bin/sh
# Written by ciscale: starts the GitHub Actions runner with its just-in-time config, once.
set -eu
env_file="${CISCALE_AGENT_ENV:-/run/ciscale/agent.env}"
runner_home="${CISCALE_RUNNER_HOME:-/opt/actions-runner}"
runner_user="${CISCALE_RUNNER_USER:-runner}"
poweroff_command="${CISCALE_POWEROFF:-poweroff}"
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        '' | '#'*) continue ;;
    esac
    export "${line%%=*}=${line#*=}"
done < "$env_file"
rm -f "$env_file"
# The config goes to the runner once, under the name it reads and then scrubs.
unset CISCALE_AGENT_TOKEN
if [ -z "${ACTIONS_RUNNER_INPUT_JITCONFIG:-}" ]; then
    echo "ciscale-agent: no ACTIONS_RUNNER_INPUT_JITCONFIG in $env_file" >&2
    $poweroff_command
    exit 1
fi
cd "$runner_home"
status=0
if [ "$(id -u)" = 0 ] && [ "$runner_user" != root ]; then
    runuser -u "$runner_user" -- ./run.sh || status=$?
else
    ./run.sh || status=$?
fi
# One job, then the instance goes.
$poweroff_command
exit "$status"
CISCALE_WRAPPER
chmod 0755 /usr/local/bin/ciscale-agent

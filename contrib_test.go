package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// This file checks the files shipped beside the binary: the systemd units,
// the daemontools run scripts and the man page.

// requireToolsEnv names the variable that CI sets so that a test whose
// outside tool is missing fails instead of skipping.
const requireToolsEnv = "GREYDAEMON_REQUIRE_TOOLS"

// requireTool returns the path of the program name, or skips the test
// (fails it when requireToolsEnv is set) with the Debian package to
// install.
func requireTool(t *testing.T, name, debianPackage string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		msg := name + " is not installed (apt-get install " + debianPackage + ")"
		if os.Getenv(requireToolsEnv) != "" {
			t.Fatalf("%s, and %s is set", msg, requireToolsEnv)
		}
		t.Skip(msg)
	}
	return path
}

// requireRoot skips the test unless it runs as root (fails it when
// requireToolsEnv is set, as CI runs as root), saying why it needs root.
func requireRoot(t *testing.T, why string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := "needs root, " + why + "; CI runs as root"
	if os.Getenv(requireToolsEnv) != "" {
		t.Fatalf("%s, and %s is set", msg, requireToolsEnv)
	}
	t.Skip(msg)
}

// TestSystemdUnits runs `systemd-analyze verify` on both units, with the
// program path pointing at an existing executable and the man page
// installed in a temporary MANPATH (so Documentation= is checked too), and
// checks the directives the service relies on.
func TestSystemdUnits(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze", "systemd")
	requireTool(t, "man", "man-db")
	dir := t.TempDir()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	service, err := os.ReadFile("contrib/systemd/greydaemon.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "DynamicUser=yes", "StateDirectory=greydaemon",
		"NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
		"RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
		"MemoryDenyWriteExecute=yes", "\nCapabilityBoundingSet=\n",
	} {
		if !bytes.Contains(service, []byte(want)) {
			t.Errorf("greydaemon.service lacks %q", want)
		}
	}
	service = bytes.ReplaceAll(service, []byte("/usr/local/bin/greydaemon"), []byte(self))
	os.WriteFile(filepath.Join(dir, "greydaemon.service"), service, 0o644)
	socket, err := os.ReadFile("contrib/systemd/greydaemon.socket")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(socket, []byte("ListenDatagram=")) {
		t.Error("greydaemon.socket has no ListenDatagram=")
	}
	os.WriteFile(filepath.Join(dir, "greydaemon.socket"), socket, 0o644)
	man := filepath.Join(dir, "man", "man8")
	os.MkdirAll(man, 0o755)
	page, _ := os.ReadFile("greydaemon.8")
	os.WriteFile(filepath.Join(man, "greydaemon.8"), page, 0o644)

	verify := func() ([]byte, error) {
		cmd := exec.Command(analyze, "verify", "./greydaemon.service", "./greydaemon.socket")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "MANPATH="+filepath.Join(dir, "man"))
		return cmd.CombinedOutput()
	}
	out, err := verify()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}

	// The check itself can fail: a misspelt directive is reported.
	bad := bytes.Replace(service, []byte("ProtectSystem=strict"), []byte("ProtectSystem=strcit"), 1)
	os.WriteFile(filepath.Join(dir, "greydaemon.service"), bad, 0o644)
	out, _ = verify()
	if !bytes.Contains(out, []byte("strcit")) {
		t.Errorf("systemd-analyze verify did not report a bad value:\n%s", out)
	}
}

// TestDaemontoolsRunScripts checks that the run scripts are executable
// shell, and that the daemon's command line in run is one greydaemon
// accepts.
func TestDaemontoolsRunScripts(t *testing.T) {
	for _, path := range []string{"contrib/daemontools/run", "contrib/daemontools/log/run"} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode()&0o111 == 0 {
			t.Errorf("%s is not executable", path)
		}
		if out, err := exec.Command("sh", "-n", path).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", path, err, out)
		}
	}
	text, _ := os.ReadFile("contrib/daemontools/run")
	var args []string
	for _, line := range strings.Split(string(text), "\n") {
		if rest, ok := strings.CutPrefix(line, "exec /usr/local/bin/greydaemon "); ok {
			args = strings.Fields(strings.ReplaceAll(rest, "$WHITELIST", "-w /etc/greydaemon/whitelist"))
		}
	}
	if args == nil {
		t.Fatal("run has no exec /usr/local/bin/greydaemon line")
	}
	set, err := parseCommandLine(args)
	if err != nil {
		t.Fatalf("run's command line %q: %v", args, err)
	}
	if set.User == "" || set.Whitelist == "" || set.ListenAddr != "127.0.0.1:1999" {
		t.Errorf("run's command line gives %+v", set.Config)
	}
}

// TestManPage lints the man page with man's own warnings and checks that it
// documents every config key and every subcommand.
func TestManPage(t *testing.T) {
	man := requireTool(t, "man", "man-db")
	cmd := exec.Command(man, "--warnings", "-l", "greydaemon.8")
	cmd.Env = append(os.Environ(), "MANWIDTH=80", "MAN_KEEP_FORMATTING=0")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stderr.Len() > 0 {
		t.Fatalf("man --warnings: %v\n%s", err, stderr.String())
	}
	text := regexp.MustCompile(".\x08").ReplaceAllString(stdout.String(), "") // overstruck bold and underline
	for _, want := range append(configKeys(), "check", "lookup", "dump", "version",
		"SIGHUP", "SIGUSR1", "SIGTERM", "EXIT STATUS", ".lock") {
		if !strings.Contains(text, want) {
			t.Errorf("the man page does not mention %q", want)
		}
	}
	doc, _ := os.ReadFile("docs/configuration.md")
	for _, key := range configKeys() {
		if !bytes.Contains(doc, []byte("`"+key+"`")) {
			t.Errorf("docs/configuration.md does not document the key %q", key)
		}
	}
}

// configKeys returns every key of the TOML configuration.
func configKeys() []string {
	var keys []string
	ct := reflect.TypeFor[Config]()
	for i := range ct.NumField() {
		keys = append(keys, ct.Field(i).Tag.Get("toml"))
	}
	return keys
}

// TestPrometheusRules checks contrib/prometheus/greydaemon.rules.yml with
// the real promtool: the file passes `promtool check rules`, and a unit
// test (`promtool test rules`) shows GreydaemonNotSaving quiet through the
// first hour after a restart, before any save (the rule suggested before
// fired at once then: the timestamp is 0), and firing once the daemon has
// run an hour without a save.
func TestPrometheusRules(t *testing.T) {
	promtool := requireTool(t, "promtool", "prometheus")
	rules, _ := filepath.Abs("contrib/prometheus/greydaemon.rules.yml")
	if out, err := exec.Command(promtool, "check", "rules", rules).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	tests := filepath.Join(t.TempDir(), "tests.yml")
	os.WriteFile(tests, []byte(fmt.Sprintf(`rule_files: [%q]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # A daemon (re)started at 100 minutes, not saved since: its last
      # save's timestamp is 0, as before any first save.
      - series: 'greydaemon_snapshot_last_success_timestamp_seconds{instance="a",job="g"}'
        values: '0x200'
      - series: 'process_start_time_seconds{instance="a",job="g"}'
        values: '6000x200'
    alert_rule_test:
      - eval_time: 110m
        alertname: GreydaemonNotSaving
        exp_alerts: []
      - eval_time: 175m
        alertname: GreydaemonNotSaving
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, job: g}
            exp_annotations:
              summary: "greydaemon on a has not saved its state for over an hour"
`, rules)), 0o644)
	if out, err := exec.Command(promtool, "test", "rules", tests).CombinedOutput(); err != nil {
		t.Errorf("promtool test rules: %v\n%s", err, out)
	}
}

// TestGrafanaDashboard reads contrib/grafana/greydaemon.json: it is JSON
// with panels, and every greydaemon_ metric its queries name is one the
// daemon serves (histogram series by their family's name).
func TestGrafanaDashboard(t *testing.T) {
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(mustRead(t, "contrib/grafana/greydaemon.json"), &dash); err != nil {
		t.Fatalf("contrib/grafana/greydaemon.json: %v", err)
	}
	if len(dash.Panels) == 0 {
		t.Fatal("no panels")
	}
	served := map[string]bool{}
	ch := make(chan *prometheus.Desc, 64)
	go func() { (&statsCollector{}).Describe(ch); close(ch) }()
	for d := range ch {
		if m := regexp.MustCompile(`fqName: "([a-z_]+)"`).FindStringSubmatch(d.String()); m != nil {
			served[m[1]] = true
		}
	}
	name := regexp.MustCompile(`greydaemon_[a-z_]+`)
	for _, p := range dash.Panels {
		for _, target := range p.Targets {
			for _, m := range name.FindAllString(target.Expr, -1) {
				family := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_count"), "_sum")
				if !served[family] {
					t.Errorf("panel %q queries %s, which greydaemon does not serve", p.Title, m)
				}
			}
		}
	}
}

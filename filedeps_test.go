package main

import (
	"go/ast"
	"go/build"
	"go/importer"
	"go/parser"
	"go/token"
	"go/types"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestFileDependencies checks the shape the package keeps: no two files use
// each other's declarations, so that the files form layers and each can be
// read knowing only the files below it.
func TestFileDependencies(t *testing.T) {
	fset := token.NewFileSet()
	names, _ := filepath.Glob("*.go")
	var files []*ast.File
	for _, name := range names {
		if ok, err := build.Default.MatchFile(".", name); strings.HasSuffix(name, "_test.go") || err != nil || !ok {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	// Type-check against the export data the go command has built for
	// the imports, which is much faster than from their source.
	out, err := exec.Command("go", "list", "-deps", "-export", "-f", "{{.ImportPath}}\t{{.Export}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	exports := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		path, export, _ := strings.Cut(line, "\t")
		exports[path] = export
	}
	lookup := func(path string) (io.ReadCloser, error) { return os.Open(exports[path]) }
	info := &types.Info{Uses: map[*ast.Ident]types.Object{}}
	conf := types.Config{Importer: importer.ForCompiler(fset, "gc", lookup)}
	if _, err := conf.Check("greydaemon", fset, files, info); err != nil {
		t.Fatal(err)
	}
	deps := map[string]map[string]bool{}
	for id, obj := range info.Uses {
		if obj.Pkg() == nil || obj.Pkg().Path() != "greydaemon" || !obj.Pos().IsValid() {
			continue
		}
		from, to := fset.File(id.Pos()).Name(), fset.File(obj.Pos()).Name()
		if from == to {
			continue
		}
		if deps[from] == nil {
			deps[from] = map[string]bool{}
		}
		deps[from][to] = true
	}
	// Reachability by Floyd-Warshall: a cycle of any length shows as two
	// files that reach each other.
	reach := map[string]map[string]bool{}
	var all []string
	for _, f := range files {
		name := fset.File(f.Pos()).Name()
		all = append(all, name)
		reach[name] = map[string]bool{}
		for to := range deps[name] {
			reach[name][to] = true
		}
	}
	for _, k := range all {
		for _, a := range all {
			if reach[a][k] {
				for b := range reach[k] {
					reach[a][b] = true
				}
			}
		}
	}
	for _, a := range all {
		for _, b := range all {
			if a < b && reach[a][b] && reach[b][a] {
				t.Errorf("%s and %s depend on each other (directly: %s uses %v, %s uses %v)",
					a, b, a, usedNames(info, fset, a, b), b, usedNames(info, fset, b, a))
			}
		}
	}
}

// usedNames returns the names declared in file to that file from uses.
func usedNames(info *types.Info, fset *token.FileSet, from, to string) []string {
	var names []string
	for id, obj := range info.Uses {
		if obj.Pos().IsValid() && fset.File(id.Pos()).Name() == from && fset.File(obj.Pos()).Name() == to {
			names = append(names, id.Name)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// TestFunctionsShort keeps every function of the daemon (not the tests)
// short enough to read in one screen: at most 70 lines.
func TestFunctionsShort(t *testing.T) {
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok {
				if n := fset.Position(fd.End()).Line - fset.Position(fd.Pos()).Line + 1; n > 70 {
					t.Errorf("%s: %s is %d lines; split it (at most 70)", name, fd.Name.Name, n)
				}
			}
		}
	}
}

